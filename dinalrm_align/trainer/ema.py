"""Exponential moving average of trainable weights, with a swap-in context for eval and saving.

``shadow <- decay * shadow + (1 - decay) * param`` every ``update_every`` optimizer steps (Flow-GRPO
uses decay 0.9 every 8 steps: roughly 80 steps of memory). The shadow copy is fp32 and lives on the
parameter's device. For partitioned parameters (DeepSpeed ZeRO-3) pass ``gather``: a context
factory ``gather(params, modify)`` that makes the full tensors available (and, with ``modify``,
re-partitions what was written), e.g. :func:`dinalrm_align.trainer.accelerator.gathered_parameters`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Gather = Callable[[Sequence[torch.nn.Parameter], bool], contextlib.AbstractContextManager]


def _no_gather(params: Sequence[torch.nn.Parameter], modify: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class EMA:
    """EMA of ``params`` (a fixed, ordered list of trainable parameters)."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        decay: float = 0.9,
        update_every: int = 1,
        gather: Gather | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every <= 0:
            raise ValueError(f"EMA update_every must be > 0, got {update_every}")
        self.params = list(params)
        self.decay = decay
        self.update_every = update_every
        self.num_updates = 0
        self.gather = gather or _no_gather
        with self.gather(self.params, False):
            self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def step(self, global_step: int) -> bool:
        """Update the average if ``global_step`` is a multiple of ``update_every``; True if updated."""
        if global_step % self.update_every != 0:
            return False
        with self.gather(self.params, False):
            for s, p in zip(self.shadow, self.params):
                s.lerp_(p.detach().float(), 1.0 - self.decay)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def _write(self, values: Sequence[torch.Tensor]) -> None:
        with self.gather(self.params, True):
            for v, p in zip(values, self.params):
                p.data.copy_(v.to(p.dtype))

    def copy_to(self) -> None:
        """Write the averaged weights into the tracked parameters."""
        self._write(self.shadow)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Temporarily replace the live weights by the EMA weights (restored exactly on exit)."""
        with self.gather(self.params, False):
            backup = [p.detach().clone() for p in self.params]
        try:
            self.copy_to()
            yield
        finally:
            self._write(backup)

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow": [s.detach().cpu() for s in self.shadow],
            "num_updates": self.num_updates,
            "decay": self.decay,
            "update_every": self.update_every,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA state has {len(shadow)} tensors, the model has {len(self.shadow)} trainable ones")
        for s, saved in zip(self.shadow, shadow):
            if s.shape != saved.shape:
                raise ValueError(f"EMA tensor shape mismatch: {tuple(saved.shape)} vs {tuple(s.shape)}")
            s.copy_(saved.to(s.device))
        self.num_updates = int(state["num_updates"])
