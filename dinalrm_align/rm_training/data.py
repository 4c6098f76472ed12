"""Preference-pair latent shards (parquet), the aspect-ratio bucket index and a bucketed sampler.

Shard layout (one parquet file per shard, zstd, written atomically by :func:`write_shard`)::

    prompt           string
    chosen_latent    binary   float32 C-order bytes of the chosen SD3-normalised latent (C, h, w)
    rejected_latent  binary   same for the rejected latent
    chosen_shape     list<int32>  (C, h, w)
    rejected_shape   list<int32>
    votes_chosen     int32 (nullable)   human votes for the chosen image
    votes_rejected   int32 (nullable)
    height, width    int32    pixel size of the bucket the images were resized to
    chosen_path, rejected_path, source   string (nullable, provenance)

Latent bytes that start with the ``.npy`` magic (as other tools store them) are decoded too.

The :class:`PairIndex` lists every pair as (shard, row, latent h, latent w, votes); it is built from
the small columns only and cached next to the shards as ``index.csv``. :class:`BucketBatchSampler`
draws batches from one bucket at a time, reshuffles every epoch, shards every global batch evenly
over processes (incomplete global batches are dropped) and resumes from its state.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "dinalrm-align/pairs-v1"
INDEX_FILE = "index.csv"
INDEX_META = "index_meta.json"
_NPY_MAGIC = b"\x93NUMPY"


# ----------------------------------------------------------------------------------------------
# Latent (de)serialisation
# ----------------------------------------------------------------------------------------------


def latent_to_bytes(latent: np.ndarray | torch.Tensor) -> tuple[bytes, list[int]]:
    """Float32 C-order bytes and shape of a latent (C, h, w)."""
    if isinstance(latent, torch.Tensor):
        latent = latent.detach().cpu().float().numpy()
    array = np.ascontiguousarray(latent, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"a latent must be (C, h, w), got shape {array.shape}")
    return array.tobytes(), [int(s) for s in array.shape]


def latent_from_bytes(buffer: bytes, shape: Sequence[int] | None) -> np.ndarray:
    """Inverse of :func:`latent_to_bytes`; ``.npy`` bytes (magic header) carry their own shape."""
    if buffer[:6] == _NPY_MAGIC:
        return np.load(io.BytesIO(buffer), allow_pickle=False).astype(np.float32, copy=False)
    if shape is None:
        raise ValueError("raw latent bytes need a shape")
    expected = int(np.prod(shape)) * 4
    if len(buffer) != expected:
        raise ValueError(f"latent bytes have {len(buffer)} bytes, shape {list(shape)} needs {expected}")
    return np.frombuffer(buffer, dtype=np.float32).reshape(tuple(shape))


@dataclass
class PairRecord:
    """One preference pair with its latents (C, h, w) float32."""

    prompt: str
    chosen: np.ndarray
    rejected: np.ndarray
    votes_chosen: int | None = None
    votes_rejected: int | None = None
    height: int = 0
    width: int = 0
    chosen_path: str | None = None
    rejected_path: str | None = None
    source: str | None = None


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("prompt", pa.string()),
            ("chosen_latent", pa.binary()),
            ("rejected_latent", pa.binary()),
            ("chosen_shape", pa.list_(pa.int32())),
            ("rejected_shape", pa.list_(pa.int32())),
            ("votes_chosen", pa.int32()),
            ("votes_rejected", pa.int32()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("chosen_path", pa.string()),
            ("rejected_path", pa.string()),
            ("source", pa.string()),
        ],
        metadata={"format": FORMAT},
    )


def write_shard(path: str | os.PathLike, records: Sequence[PairRecord], row_group_size: int = 256) -> Path:
    """Write ``records`` to one parquet shard atomically (``.tmp`` file renamed when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not records:
        raise ValueError("a shard needs at least one record")
    cols: dict[str, list[Any]] = {name: [] for name in _schema().names}
    for r in records:
        cb, cs = latent_to_bytes(r.chosen)
        rb, rs = latent_to_bytes(r.rejected)
        if cs != rs:
            raise ValueError(f"pair {r.prompt!r}: chosen {cs} and rejected {rs} latents differ in shape")
        for key, value in (
            ("prompt", r.prompt),
            ("chosen_latent", cb),
            ("rejected_latent", rb),
            ("chosen_shape", cs),
            ("rejected_shape", rs),
            ("votes_chosen", r.votes_chosen),
            ("votes_rejected", r.votes_rejected),
            ("height", r.height),
            ("width", r.width),
            ("chosen_path", r.chosen_path),
            ("rejected_path", r.rejected_path),
            ("source", r.source),
        ):
            cols[key].append(value)
    table = pa.Table.from_pydict(cols, schema=_schema())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
    os.replace(tmp, path)
    return path


def list_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Parquet shards of a folder (sorted; temporary files skipped), a single file, or a list."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        root = Path(source)
        if root.is_file():
            paths = [root]
        elif root.is_dir():
            paths = sorted(p for p in root.glob("*.parquet") if not p.name.startswith("."))
        else:
            raise FileNotFoundError(f"pair shards not found: {root}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"pair shard(s) not found: {', '.join(missing)}")
    if not paths:
        raise FileNotFoundError(f"no .parquet shards in {source}")
    return paths


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


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """A batch of pairs of one bucket: latents (B, C, h, w) float32, prompts, votes (B,) (-1 unknown)."""

    prompts: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    votes_chosen: torch.Tensor
    votes_rejected: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class PairDataset:
    """Random access to the pairs of a :class:`PairIndex` (memory-mapped shards, small LRU of open files)."""

    index: PairIndex
    max_open: int = 8
    _tables: OrderedDict[int, Any] = field(default_factory=OrderedDict, repr=False)

    @classmethod
    def from_source(cls, source: str | os.PathLike | Sequence[str | os.PathLike]) -> PairDataset:
        return cls(build_index(source))

    def __len__(self) -> int:
        return len(self.index)

    def _table(self, shard_id: int) -> Any:
        import pyarrow.parquet as pq

        table = self._tables.get(shard_id)
        if table is None:
            table = pq.read_table(
                self.index.shards[shard_id],
                columns=["prompt", "chosen_latent", "rejected_latent", "chosen_shape", "rejected_shape"],
                memory_map=True,
            )
            self._tables[shard_id] = table
            while len(self._tables) > self.max_open:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(shard_id)
        return table

    def record(self, position: int) -> tuple[str, np.ndarray, np.ndarray]:
        """``(prompt, chosen, rejected)`` of the pair at ``position`` in the index."""
        if not 0 <= position < len(self.index):
            raise IndexError(f"pair {position} out of range for {len(self.index)} pairs")
        table = self._table(int(self.index.shard_id[position]))
        row = table.slice(int(self.index.row[position]), 1).to_pylist()[0]
        return (
            row["prompt"],
            latent_from_bytes(row["chosen_latent"], row["chosen_shape"]),
            latent_from_bytes(row["rejected_latent"], row["rejected_shape"]),
        )

    def batch(self, positions: Sequence[int]) -> PairBatch:
        """Stack the pairs at ``positions`` (must share one latent size)."""
        if len(positions) == 0:
            raise ValueError("a batch needs at least one pair")
        prompts, chosen, rejected = [], [], []
        for pos in positions:
            prompt, c, r = self.record(int(pos))
            prompts.append(prompt)
            chosen.append(c)
            rejected.append(r)
        shapes = {c.shape for c in chosen}
        if len(shapes) != 1:
            raise ValueError(f"pairs of one batch must share a latent size, got {sorted(shapes)}")
        pos = np.asarray(positions, dtype=np.int64)
        return PairBatch(
            prompts,
            torch.from_numpy(np.stack(chosen)),
            torch.from_numpy(np.stack(rejected)),
            torch.from_numpy(self.index.votes_chosen[pos].copy()),
            torch.from_numpy(self.index.votes_rejected[pos].copy()),
        )


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------


class BucketBatchSampler:
    """Infinite, resumable stream of single-bucket batches, evenly sharded over processes.

    Each epoch: the pairs of every bucket are permuted (seeded by ``seed`` and the epoch), cut into
    global batches of ``batch_size * num_processes`` pairs (the incomplete rest is dropped), and the
    global batches of all buckets are interleaved in a seeded random order. Process ``rank`` takes
    the ``rank``-th ``batch_size`` slice of every global batch. The state is ``(epoch, position)``.
    """

    def __init__(
        self,
        index: PairIndex,
        batch_size: int,
        *,
        num_processes: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_processes:
            raise ValueError(f"rank {rank} out of range for {num_processes} processes")
        self.index = index
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._plan_epoch = -1
        self._plan: list[np.ndarray] = []
        if self.batches_per_epoch() == 0:
            sizes = {k: len(v) for k, v in index.buckets().items()}
            raise ValueError(
                f"no bucket holds a full global batch of {batch_size * num_processes} pairs "
                f"(batch_size {batch_size} x {num_processes} processes); bucket sizes: {sizes}"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    def batches_per_epoch(self) -> int:
        return sum(len(v) // self.global_batch for v in self.index.buckets().values())

    def _epoch_plan(self, epoch: int) -> list[np.ndarray]:
        if epoch == self._plan_epoch:
            return self._plan
        rng = np.random.default_rng([self.seed, epoch])
        plan: list[np.ndarray] = []
        for _, members in sorted(self.index.buckets().items()):
            order = rng.permutation(members) if self.shuffle else members
            full = len(order) // self.global_batch
            plan += [order[i * self.global_batch : (i + 1) * self.global_batch] for i in range(full)]
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        self._plan_epoch, self._plan = epoch, plan
        return plan

    def next_batch(self) -> list[int]:
        """Positions (into the index) of this process' next batch."""
        plan = self._epoch_plan(self.epoch)
        if self.position >= len(plan):
            self.epoch += 1
            self.position = 0
            plan = self._epoch_plan(self.epoch)
        global_batch = plan[self.position]
        self.position += 1
        lo = self.rank * self.batch_size
        return [int(i) for i in global_batch[lo : lo + self.batch_size]]

    def epoch_batches(self) -> Iterator[list[int]]:
        """This process' batches of the current epoch from the current position (advances the state)."""
        epoch = self.epoch
        while self.epoch == epoch and self.position < len(self._epoch_plan(epoch)):
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_pairs": len(self.index)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_pairs"]) != len(self.index):
            raise ValueError(
                f"sampler state was saved for {state['num_pairs']} pairs, this dataset has {len(self.index)}: "
                "resume with the same data"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
