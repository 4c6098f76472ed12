"""Random access to preference pairs and the bucketed, resumable, distributed batch sampler.

:class:`PairDataset` reads pairs of a :class:`~dinalrm_align.rm_training.pair_index.PairIndex` from
memory-mapped shards. :class:`BucketBatchSampler` draws batches from one aspect-ratio bucket at a time,
reshuffles every epoch, shards every global batch evenly over processes (incomplete global batches are
dropped) and resumes from its state. The shard and index helpers are re-exported here.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dinalrm_align.rm_training.pair_index import (
    INDEX_FILE,
    INDEX_META,
    PairIndex,
    build_index,
    min_votes_filter,
)
from dinalrm_align.rm_training.shards import (
    FORMAT,
    PairRecord,
    latent_from_bytes,
    latent_to_bytes,
    list_shards,
    write_shard,
)

__all__ = [
    "FORMAT", "INDEX_FILE", "INDEX_META", "BucketBatchSampler", "PairBatch", "PairDataset", "PairIndex", "PairRecord",
    "build_index", "latent_from_bytes", "latent_to_bytes", "list_shards", "min_votes_filter", "write_shard",
]

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

    @property
    def epoch_progress(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self.epoch + self.position / max(1, self.batches_per_epoch())

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
