"""Preference pairs from disk: the ``jsonl``, ``hpdv3`` and ``pickapic`` input layouts.

- ``jsonl``: one object per line ``{"prompt", "chosen_path", "rejected_path"}`` with optional
  ``votes_chosen`` / ``votes_rejected``; relative paths are resolved against ``image_root``
  (default: the jsonl's folder).
- ``hpdv3``: HPDv3's ``train.json`` / ``test.json`` (a JSON list or jsonl) with ``prompt``,
  ``path1``, ``path2`` and optional ``choice_dist`` = [votes for path1, votes for path2]. ``path1``
  is taken as the preferred image unless ``choice_dist`` says otherwise (then the pair is swapped).
- ``pickapic``: Pick-a-Pic parquet files (one file or a folder) with ``caption``, ``jpg_0``,
  ``jpg_1`` (encoded image bytes) and ``label_0`` / ``label_1`` (1 = preferred; 0.5 each = tie, dropped).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAYOUTS: tuple[str, ...] = ("jsonl", "hpdv3", "pickapic")


@dataclass
class PairInput:
    """One input pair: images are paths or encoded bytes."""

    id: str
    prompt: str
    chosen: str | bytes
    rejected: str | bytes
    votes_chosen: int | None = None
    votes_rejected: int | None = None
    drop_reason: str = ""


def _resolve(path: str, root: Path) -> str:
    return path if os.path.isabs(path) else str(root / path)


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not valid JSON: {exc}") from exc
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: every entry must be a JSON object")
    return rows


def _require(row: dict[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where} lacks field(s) {missing}; it has {sorted(row)}")


def read_pairs(source: str | os.PathLike, layout: str = "jsonl", image_root: str | None = None) -> list[PairInput]:
    """Read the input pairs of ``source`` in ``layout`` (see the module docstring)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if layout == "pickapic":
        return _read_pickapic(path)
    root = Path(image_root) if image_root else path.parent
    pairs = []
    for i, row in enumerate(_read_json_rows(path)):
        where = f"{path} entry {i}"
        if layout == "jsonl":
            _require(row, ("prompt", "chosen_path", "rejected_path"), where)
            pairs.append(
                PairInput(
                    str(row.get("id", i)),
                    str(row["prompt"]),
                    _resolve(row["chosen_path"], root),
                    _resolve(row["rejected_path"], root),
                    row.get("votes_chosen"),
                    row.get("votes_rejected"),
                )
            )
        else:  # hpdv3
            _require(row, ("prompt", "path1", "path2"), where)
            chosen, rejected = _resolve(row["path1"], root), _resolve(row["path2"], root)
            votes = row.get("choice_dist")
            vc = vr = None
            if isinstance(votes, (list, tuple)) and len(votes) == 2:
                vc, vr = int(votes[0]), int(votes[1])
                if vr > vc:
                    chosen, rejected, vc, vr = rejected, chosen, vr, vc
            pairs.append(PairInput(str(row.get("id", i)), str(row["prompt"]), chosen, rejected, vc, vr))
    return pairs


def _read_pickapic(path: Path) -> list[PairInput]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .parquet files in {path}")
    pairs = []
    for f in files:
        table = pq.read_table(f)
        names = set(table.column_names)
        missing = [k for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1") if k not in names]
        if missing:
            raise ValueError(f"{f} lacks Pick-a-Pic column(s) {missing}; it has {sorted(names)}")
        for i, row in enumerate(table.to_pylist()):
            pid = f"{f.name}:{i}"
            l0, l1 = float(row["label_0"]), float(row["label_1"])
            if l0 == l1:
                pairs.append(PairInput(pid, row["caption"] or "", row["jpg_0"], row["jpg_1"], drop_reason="tie"))
            elif l0 > l1:
                pairs.append(PairInput(pid, row["caption"] or "", row["jpg_0"], row["jpg_1"]))
            else:
                pairs.append(PairInput(pid, row["caption"] or "", row["jpg_1"], row["jpg_0"]))
    return pairs
