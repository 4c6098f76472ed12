"""The pair index: every pair of a set of shards as (shard, row, latent h, latent w, votes).

Built from the small columns only and cached next to the shards as ``index.csv`` (with
``index_meta.json`` holding the shards' signature, so a changed shard rebuilds it).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinalrm_align.rm_training.shards import FORMAT, list_shards

INDEX_FILE = "index.csv"
INDEX_META = "index_meta.json"

# ----------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------


@dataclass
class PairIndex:
    """Every pair as (shard id, row, latent h, latent w, votes); ``shards`` are the files."""

    shards: list[Path]
    shard_id: np.ndarray
    row: np.ndarray
    height: np.ndarray
    width: np.ndarray
    votes_chosen: np.ndarray  # -1 when unknown
    votes_rejected: np.ndarray

    def __len__(self) -> int:
        return int(self.shard_id.shape[0])

    def buckets(self) -> dict[tuple[int, int], np.ndarray]:
        """Latent size ``(h, w)`` -> positions (into this index) of the pairs of that size."""
        keys = self.height.astype(np.int64) * 1_000_000 + self.width.astype(np.int64)
        out: dict[tuple[int, int], np.ndarray] = {}
        for key in np.unique(keys):
            out[(int(key // 1_000_000), int(key % 1_000_000))] = np.nonzero(keys == key)[0]
        return out

    def subset(self, positions: np.ndarray | Sequence[int]) -> PairIndex:
        pos = np.asarray(positions, dtype=np.int64)
        return PairIndex(
            self.shards,
            self.shard_id[pos],
            self.row[pos],
            self.height[pos],
            self.width[pos],
            self.votes_chosen[pos],
            self.votes_rejected[pos],
        )

    def filter(self, keep: Callable[[PairIndex], np.ndarray]) -> PairIndex:
        """Keep the pairs where ``keep(index)`` (a boolean array over the index) is true."""
        mask = np.asarray(keep(self), dtype=bool)
        if mask.shape != (len(self),):
            raise ValueError(f"filter must return a boolean array of shape ({len(self)},), got {mask.shape}")
        return self.subset(np.nonzero(mask)[0])

    def split(self, num_eval: int, seed: int = 0) -> tuple[PairIndex, PairIndex]:
        """``(train, eval)``: ``num_eval`` pairs held out by a seeded permutation."""
        if not 0 <= num_eval < len(self):
            raise ValueError(f"cannot hold out {num_eval} of {len(self)} pairs")
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(np.sort(order[num_eval:])), self.subset(np.sort(order[:num_eval]))


def min_votes_filter(min_votes: int) -> Callable[[PairIndex], np.ndarray]:
    """Filter hook: keep pairs whose chosen image got at least ``min_votes`` votes (unknown votes pass)."""

    def keep(index: PairIndex) -> np.ndarray:
        return (index.votes_chosen < 0) | (index.votes_chosen >= min_votes)

    return keep


def _shard_signature(paths: Sequence[Path]) -> list[dict[str, Any]]:
    return [{"name": p.name, "size": p.stat().st_size} for p in paths]


def build_index(source: str | os.PathLike | Sequence[str | os.PathLike], cache: bool = True) -> PairIndex:
    """Index the pairs of ``source`` (folder, file or list of files).

    Reads only the shape and vote columns. For a folder the index is cached as ``index.csv``
    (+ ``index_meta.json`` with the shard names and sizes) and rebuilt when the shards change.
    """
    import pyarrow.parquet as pq

    shards = list_shards(source)
    root = Path(source) if not isinstance(source, (list, tuple)) and Path(source).is_dir() else None
    signature = _shard_signature(shards)
    if cache and root is not None and (root / INDEX_FILE).is_file() and (root / INDEX_META).is_file():
        try:
            meta = json.loads((root / INDEX_META).read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("shards") == signature:
            return _read_index_csv(root / INDEX_FILE, shards)
    cols: dict[str, list[int]] = {k: [] for k in ("shard_id", "row", "height", "width", "vc", "vr")}
    for sid, path in enumerate(shards):
        table = pq.read_table(path, columns=["chosen_shape", "rejected_shape", "votes_chosen", "votes_rejected"])
        chosen = table.column("chosen_shape").to_pylist()
        rejected = table.column("rejected_shape").to_pylist()
        vc = table.column("votes_chosen").to_pylist()
        vr = table.column("votes_rejected").to_pylist()
        for row, (cs, rs) in enumerate(zip(chosen, rejected)):
            if cs is None or rs is None or list(cs) != list(rs) or len(cs) != 3:
                raise ValueError(f"{path} row {row}: bad latent shapes chosen={cs} rejected={rs}")
            cols["shard_id"].append(sid)
            cols["row"].append(row)
            cols["height"].append(int(cs[1]))
            cols["width"].append(int(cs[2]))
            cols["vc"].append(-1 if vc[row] is None else int(vc[row]))
            cols["vr"].append(-1 if vr[row] is None else int(vr[row]))
    index = PairIndex(
        shards,
        *(np.asarray(cols[k], dtype=np.int64) for k in ("shard_id", "row", "height", "width", "vc", "vr")),
    )
    if cache and root is not None:
        _write_index_csv(root / INDEX_FILE, index)
        meta_tmp = root / f".tmp_{os.getpid()}_{INDEX_META}"
        meta_tmp.write_text(json.dumps({"format": FORMAT, "shards": signature}, indent=1))
        os.replace(meta_tmp, root / INDEX_META)
    return index


def _write_index_csv(path: Path, index: PairIndex) -> None:
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")  # several processes may build it at once
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["global_id", "shard", "row", "height", "width", "votes_chosen", "votes_rejected"])
        for i in range(len(index)):
            writer.writerow(
                [
                    i,
                    index.shards[index.shard_id[i]].name,
                    index.row[i],
                    index.height[i],
                    index.width[i],
                    index.votes_chosen[i],
                    index.votes_rejected[i],
                ]
            )
    os.replace(tmp, path)


def _read_index_csv(path: Path, shards: list[Path]) -> PairIndex:
    ids = {p.name: i for i, p in enumerate(shards)}
    cols: dict[str, list[int]] = {k: [] for k in ("shard_id", "row", "height", "width", "vc", "vr")}
    with path.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            cols["shard_id"].append(ids[rec["shard"]])
            cols["row"].append(int(rec["row"]))
            cols["height"].append(int(rec["height"]))
            cols["width"].append(int(rec["width"]))
            cols["vc"].append(int(rec["votes_chosen"]))
            cols["vr"].append(int(rec["votes_rejected"]))
    return PairIndex(
        shards,
        *(np.asarray(cols[k], dtype=np.int64) for k in ("shard_id", "row", "height", "width", "vc", "vr")),
    )
