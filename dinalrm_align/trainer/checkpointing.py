"""Atomic, resumable checkpoints on top of ``accelerator.save_state`` / ``load_state``.

Layout of ``run_dir/checkpoints/``::

    step_000010/                 what accelerate writes (optimizer, scheduler, RNG states, the objects
                                 registered with ``register_for_checkpointing``, DeepSpeed / FSDP shards)
      trainable.safetensors      the trainable weights (written by the trainer's save hook; not under
                                 DeepSpeed / FSDP, which store their own shards)
      checkpoint.json            written last: step, processes, fingerprints, file sizes, meta
    latest                       name of the newest complete checkpoint

A checkpoint is written into ``.tmp_step_000010``, every file is fsync'ed, and the folder is renamed
when complete, so an interrupted save never looks like a checkpoint; older checkpoints beyond
``keep_last`` are removed only after that. On resume the newest checkpoint is verified first (marker,
file sizes, safetensors headers, and every pickle loads with ``weights_only=True``); a corrupt or
incomplete one is skipped with a warning naming it and the previous one is used. The recipe and data
fingerprints stored in the marker must match the run's (unless the recipe allows a change).
All processes must call :meth:`CheckpointManager.save` and :meth:`CheckpointManager.resume`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.atomic import fsync, fsync_tree, write_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError", "CheckpointManager", "check_fresh_run_dir", "list_checkpoints", "read_marker",
    "resolve_checkpoint_spec",
]

MARKER = "checkpoint.json"
LATEST = "latest"
FORMAT_VERSION = 2
_STEP_RE = re.compile(r"^step_(\d+)$")
_PICKLE_SUFFIXES = (".pkl", ".bin", ".pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt, unsafe, or from another run)."""


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The marker of a checkpoint folder (CheckpointError if missing or unreadable)."""
    file = Path(path) / MARKER
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: it has no {MARKER}")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is unreadable ({exc})") from exc


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Folders named ``step_N`` that hold a marker, oldest first (not verified)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint_spec(spec: str | None, run_dir: str | os.PathLike) -> list[Path]:
    """Candidate checkpoints for ``checkpoint.resume``, newest first.

    ``None`` -> ``[]``; ``latest`` -> every complete checkpoint of ``run_dir`` (empty if none); a path ->
    that checkpoint only (FileNotFoundError if missing, CheckpointError if it is no checkpoint).
    """
    if spec is None or spec == "":
        return []
    if spec == "latest":
        return list(reversed(list_checkpoints(Path(run_dir) / "checkpoints")))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    if not (path / MARKER).is_file():
        inner = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        hint = f" (it contains checkpoints; did you mean {inner[-1]} or 'latest'?)" if inner else ""
        raise CheckpointError(f"{path} is not a checkpoint folder: it has no {MARKER}{hint}")
    return [path]


def check_fresh_run_dir(run_dir: str | os.PathLike) -> None:
    """CheckpointError if ``run_dir`` already holds complete checkpoints: a fresh run there would mix with
    them (and its rotation would delete its own, lower-numbered checkpoints first)."""
    earlier = list_checkpoints(Path(run_dir) / "checkpoints")
    if earlier:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints of an earlier run (newest: {earlier[-1].name}): resume it with "
            "--resume latest (checkpoint.resume: latest), or start fresh in another run_dir"
        )


def _safe_globals() -> list[Any]:
    """Globals allowed in checkpoint pickles: numpy arrays (RNG states) and DeepSpeed's plain config types."""
    import numpy as np

    allowed: list[Any] = [np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or np.core
    allowed.append(core.multiarray._reconstruct)
    if hasattr(np, "dtypes"):
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        allowed += list(TORCH_SAFE_GLOBALS)
    except ImportError:  # pragma: no cover
        pass
    try:  # DeepSpeed optimizer shards carry its loss-scaler and ZeRO-stage objects
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum]
    except Exception:  # noqa: BLE001 - deepspeed is optional
        pass
    return allowed


def verify_checkpoint(path: Path, world_size: int) -> dict[str, Any]:
    """Marker, file sizes, safetensors headers and ``weights_only`` pickles; returns the marker."""
    marker = read_marker(path)
    if int(marker.get("format_version", 0)) != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {marker.get('format_version')}, expected {FORMAT_VERSION}")
    if int(marker["num_processes"]) != world_size:
        raise CheckpointError(
            f"{path} was written by {marker['num_processes']} processes; this launch has {world_size} "
            "(resume with the same number of processes)"
        )
    for rel, size in marker.get("files", {}).items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: {rel} is missing")
        if file.stat().st_size != int(size):
            raise CheckpointError(f"{path} is corrupt: {rel} has {file.stat().st_size} bytes, expected {size}")
    allowed = _safe_globals()
    for rel in marker.get("files", {}):
        file = path / rel
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as fh:
                    fh.keys()
            elif file.suffix in _PICKLE_SUFFIXES:
                with torch.serialization.safe_globals(allowed):
                    torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure makes the checkpoint unusable
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{path} is corrupt or unsafe: {rel} does not load safely ({reason})") from exc
    return marker


def _diff_keys(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = ", ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


class CheckpointManager:
    """Writes and resumes checkpoints under ``run_dir/checkpoints`` (see the module docstring).

    Args:
        run_dir: the run folder (on a file system every process sees).
        accelerator: the run's accelerator (models, optimizer, scheduler prepared; custom objects registered).
        keep_last: complete checkpoints to keep.
        recipe: flattened recipe (fingerprinted keys only) stored in the marker.
        recipe_fingerprint, data_fingerprint: compared on resume.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        accelerator: Any,
        *,
        keep_last: int = 3,
        recipe: dict[str, Any] | None = None,
        recipe_fingerprint: str = "",
        data_fingerprint: str = "",
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.recipe = recipe or {}
        self.recipe_fingerprint = recipe_fingerprint
        self.data_fingerprint = data_fingerprint

    # ------------------------------------------------------------------ helpers
    @property
    def _is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _barrier(self) -> None:
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()

    def _engine_kwargs(self, saving: bool) -> dict[str, Any]:
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # frozen base weights are not part of a run's state: they come from the pipeline again
            return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}
        return {}

    def latest(self) -> Path | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, meta: dict[str, Any] | None = None, extra: Any = None) -> Path:
        """Write checkpoint ``step`` atomically (every process calls it). Returns its folder.

        ``extra``: called as ``extra(folder)`` on the main process before the marker is written, to add
        files that are part of the checkpoint (e.g. an exported model).
        """
        final = self.root / step_dirname(step)
        tmp = self.root / f".tmp_{step_dirname(step)}"
        if self._is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp_step_*"):  # left by an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()
        try:
            self.accelerator.save_state(str(tmp), **self._engine_kwargs(saving=True))
            self._barrier()
            if self._is_main:
                self._complete(tmp, final, step, meta, extra)
        except BaseException:
            if self._is_main:  # e.g. a full disk: no half-written folder stays behind; `latest` is untouched
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._barrier()
        return final

    def _complete(self, tmp: Path, final: Path, step: int, meta: dict[str, Any] | None, extra: Any) -> None:
        """Main process: export extras, write the marker, fsync, rename into place, point `latest`, rotate."""
        if extra is not None:
            extra(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        marker = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "num_processes": self.accelerator.num_processes,
            "recipe_fingerprint": self.recipe_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "recipe": self.recipe,
            "files": files,
            "time": time.time(),
            "meta": meta or {},
        }
        write_atomic(tmp / MARKER, json.dumps(marker, indent=2, default=str))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(self.root)
        write_atomic(self.root / LATEST, final.name + "\n")
        self._rotate()

    def _rotate(self) -> None:
        found = list_checkpoints(self.root)
        for old in found[: max(0, len(found) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ resume
    def resume(self, spec: str | None, *, allow_recipe_change: bool = False) -> dict[str, Any] | None:
        """Load the checkpoint ``spec`` names (``latest`` / a folder); returns its marker (None: fresh start).

        A corrupt or incomplete newest checkpoint is skipped (warning naming it) in favour of the
        previous one. Fingerprint mismatches raise CheckpointError unless ``allow_recipe_change``.
        """
        candidates = resolve_checkpoint_spec(spec, self.root.parent)
        world = self.accelerator.num_processes
        explicit = spec not in (None, "", "latest")
        for i, path in enumerate(candidates):
            try:
                marker = verify_checkpoint(path, world)
            except CheckpointError as exc:
                if explicit or i == len(candidates) - 1:
                    raise
                logger.warning("skipping checkpoint %s: %s; falling back to the previous one", path, exc)
                continue
            self._check_fingerprints(path, marker, allow_recipe_change)
            try:
                self.accelerator.load_state(str(path), **self._engine_kwargs(saving=False))
            except Exception as exc:  # noqa: BLE001
                if world > 1 or explicit or i == len(candidates) - 1:
                    raise CheckpointError(f"could not load checkpoint {path}: {exc}") from exc
                logger.warning("checkpoint %s failed to load (%s); falling back to the previous one", path, exc)
                continue
            return marker
        return None

    def _check_fingerprints(self, path: Path, marker: dict[str, Any], allow_change: bool) -> None:
        problems = []
        if marker.get("recipe_fingerprint") != self.recipe_fingerprint:
            problems.append(f"the recipe differs ({_diff_keys(marker.get('recipe', {}), self.recipe)})")
        if marker.get("data_fingerprint") != self.data_fingerprint:
            problems.append("the training data differs (another prompt set / pair index)")
        if not problems:
            return
        text = f"checkpoint {path} was written by another run: " + "; ".join(problems)
        if allow_change:
            logger.warning("%s; resuming anyway (checkpoint.allow_recipe_change: true)", text)
            return
        raise CheckpointError(text + ". Resume with the same recipe and data, or set checkpoint.allow_recipe_change=true"
                              " (--allow-recipe-change) for a deliberate change.")
