"""Group-aware prompt sampling for GRPO: a distributed, resumable k-repeat sampler.

Rollout batch ``b`` is one *global* batch of ``batch_size * num_processes`` samples made of
``m = batch_size * num_processes / group_size`` distinct prompts, each repeated ``group_size`` (k)
times, shuffled with a seed that every process derives identically; process ``rank`` takes the
contiguous slice ``[rank * batch_size, (rank + 1) * batch_size)``. A group (the k samples of one
prompt) is therefore usually spread over several processes, so rewards must be gathered before
per-group advantages are computed (see :mod:`dinalrm_align.algorithms.advantages`).

The m prompts of a batch are taken from seeded permutations of the prompt set ("passes"): a pass
holds ``len(prompts) // m`` batches and every prompt appears at most once per pass, so prompts are
covered evenly and a batch never holds the same prompt twice. Everything is a pure function of
``(seed, batch index)``: the only state is a counter, so resuming is exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["KRepeatSampler", "prompt_group_ids", "stable_hash"]

_MASK63 = 2**63 - 1


def stable_hash(*parts: Any) -> int:
    """63-bit integer from the ``str`` of each part (blake2b; identical on every process and machine)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & _MASK63


def prompt_group_ids(prompts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Group ids ``(N,)`` int64 of ``prompts``: equal prompts get equal ids on every process.

    Unlike :class:`~dinalrm_align.algorithms.advantages.PromptGrouper` (ids in order of appearance,
    local to one process) these ids can be gathered across processes as a tensor.
    """
    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts must be a sequence of prompts, not a single string")
    return torch.tensor([stable_hash("prompt", p) for p in prompts], dtype=torch.long, device=device)


class KRepeatSampler:
    """Distributed k-repeat prompt sampler with the trainer's sampler interface.

    The trainer calls :meth:`next_batch` once per training chunk (one ``Algorithm.train_step``).
    A GRPO *epoch* is ``batches_per_epoch`` rollout batches followed by ``batches_per_epoch``
    training chunks, so the first call of an epoch returns this process' prompts of all the
    epoch's rollout batches (``batches_per_epoch * batch_size`` prompts, batch-major) and the
    other ``batches_per_epoch - 1`` calls return ``[]`` (keep training on the current rollouts).

    Args:
        prompts: the training prompts.
        batch_size: samples per process per rollout batch.
        group_size: k, samples per prompt; ``batch_size * num_processes`` must be divisible by it.
        num_processes, rank: this process' place in the run.
        seed: shared by all processes.
        batches_per_epoch: rollout batches per epoch.

    Raises:
        ValueError: the global batch does not divide into groups, or holds more distinct prompts
            than there are training prompts.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        batch_size: int,
        group_size: int,
        *,
        num_processes: int = 1,
        rank: int = 0,
        seed: int = 0,
        batches_per_epoch: int = 1,
    ) -> None:
        if not prompts:
            raise ValueError("the training prompt set is empty")
        if batch_size < 1 or group_size < 1 or batches_per_epoch < 1:
            raise ValueError(
                f"batch_size, group_size and batches_per_epoch must be >= 1, got {batch_size}, {group_size}, "
                f"{batches_per_epoch}"
            )
        if not 0 <= rank < num_processes:
            raise ValueError(f"rank {rank} out of range for {num_processes} processes")
        global_batch = batch_size * num_processes
        if global_batch % group_size:
            raise ValueError(
                f"a rollout batch of {batch_size} samples x {num_processes} processes = {global_batch} samples "
                f"cannot be split into groups of {group_size} (algorithm.group_size); choose train.batch_size so "
                f"that batch_size x processes is a multiple of group_size"
            )
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.group_size = group_size
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch
        self.prompts_per_batch = global_batch // group_size
        if self.prompts_per_batch > len(self.prompts):
            raise ValueError(
                f"a rollout batch needs {self.prompts_per_batch} distinct prompts but there are only "
                f"{len(self.prompts)} training prompts"
            )
        self.batches_per_pass = len(self.prompts) // self.prompts_per_batch
        self.calls = 0
        self._perm_pass = -1
        self._perm: list[int] = []

    # ------------------------------------------------------------------ pure index maths
    def _pass_perm(self, pass_index: int) -> list[int]:
        if pass_index != self._perm_pass:
            g = torch.Generator().manual_seed(stable_hash("krepeat-pass", self.seed, pass_index))
            self._perm = torch.randperm(len(self.prompts), generator=g).tolist()
            self._perm_pass = pass_index
        return self._perm

    def batch_prompt_ids(self, batch: int) -> list[int]:
        """The m distinct prompt indices of rollout batch ``batch`` (before repetition)."""
        pass_index, j = divmod(batch, self.batches_per_pass)
        m = self.prompts_per_batch
        return self._pass_perm(pass_index)[j * m : (j + 1) * m]

    def global_indices(self, batch: int) -> list[int]:
        """Prompt indices of the whole global batch ``batch`` (``batch_size * num_processes``), rank-major."""
        unique = torch.tensor(self.batch_prompt_ids(batch), dtype=torch.long)
        repeated = unique.repeat_interleave(self.group_size)
        g = torch.Generator().manual_seed(stable_hash("krepeat-shuffle", self.seed, batch))
        return repeated[torch.randperm(repeated.numel(), generator=g)].tolist()

    def rank_indices(self, batch: int) -> list[int]:
        """This process' ``batch_size`` prompt indices of rollout batch ``batch``."""
        start = self.rank * self.batch_size
        return self.global_indices(batch)[start : start + self.batch_size]

    # ------------------------------------------------------------------ trainer interface
    @property
    def epoch(self) -> int:
        """Rollout epochs started so far."""
        return -(-self.calls // self.batches_per_epoch)

    @property
    def position(self) -> int:
        """Distinct prompt draws so far (``position / len(prompts)`` = passes over the prompt set)."""
        return self.epoch * self.batches_per_epoch * self.prompts_per_batch

    @property
    def epoch_progress(self) -> float:
        """Passes over the prompt set so far (fractional)."""
        return self.position / len(self.prompts)

    def next_batch(self) -> list[str]:
        """The next epoch's prompts on the first call of an epoch, ``[]`` on the others (see class doc)."""
        out: list[str] = []
        if self.calls % self.batches_per_epoch == 0:
            first = (self.calls // self.batches_per_epoch) * self.batches_per_epoch
            for b in range(first, first + self.batches_per_epoch):
                out.extend(self.prompts[i] for i in self.rank_indices(b))
        self.calls += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "seed": self.seed,
            "num_prompts": len(self.prompts),
            "batch_size": self.batch_size,
            "group_size": self.group_size,
            "num_processes": self.num_processes,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_prompts", "batch_size", "group_size", "num_processes", "batches_per_epoch"):
            if key not in state:
                raise ValueError(
                    f"checkpoint data state has no {key!r}: it was not written by a k-repeat (GRPO) sampler"
                )
            mine = len(self.prompts) if key == "num_prompts" else getattr(self, key)
            if int(state[key]) != mine:
                raise ValueError(f"checkpoint was written with {key}={state[key]}, this run has {mine}: resume with the same setup")
        self.calls = int(state["calls"])
        self.seed = int(state["seed"])
