"""Crash-safe file writes shared by checkpoints, saved models and preprocessing (a leaf module).

A reader never sees a half-written file or folder: content goes to a temporary sibling, is fsynced, and
appears under its name with one ``os.replace``. Temporary folders get the permissions a plain ``mkdir``
would give (``tempfile.mkdtemp`` creates them private, 0700).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["fsync", "fsync_tree", "replace_folder", "staging_dir", "write_atomic"]


def fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk (best effort: some file systems refuse folder fsync)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(str(path), flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (deepest first), then ``root``."""
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        fsync(p)
    fsync(root)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling + fsync + rename (removed on failure)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)


def staging_dir(parent: Path, prefix: str) -> Path:
    """A new empty temporary folder in ``parent`` with ordinary permissions (for a later rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def replace_folder(staged: Path, target: Path) -> None:
    """Move the complete folder ``staged`` to ``target``; an existing ``target`` is renamed aside first and
    deleted only once the new one is in place."""
    fsync_tree(staged)
    old = target.parent / f".old_{target.name}"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
