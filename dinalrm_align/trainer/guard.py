"""Divergence detection: non-finite losses, gradient norms and rewards, found on the device.

:class:`DivergenceGuard` records, per quantity, the first optimizer step at which a non-finite value
appeared, without a host synchronisation. :meth:`DivergenceGuard.check` synchronises (the trainer calls
it at log steps and before every checkpoint) and raises :class:`TrainingDiverged` naming the quantity
and the step. Because the check runs before every checkpoint save, no checkpoint is ever written after
the first non-finite value, so rotation never removes the last good one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from dinalrm_align.errors import TrainingDiverged

__all__ = ["DivergenceGuard", "TrainingDiverged"]

QUANTITIES = ("loss", "grad_norm", "reward")
_NONE = 2**62


def _any_nonfinite(values: Iterable[Any], device: torch.device) -> torch.Tensor:
    flags = [~torch.isfinite(torch.as_tensor(v, device=device).detach().float()).all() for v in values if v is not None]
    return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=device)


class DivergenceGuard:
    """First step of a non-finite loss / gradient norm / reward on this process (device-side)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_bad = torch.full((len(QUANTITIES),), _NONE, dtype=torch.long, device=device)

    def flags(self, loss: Any, grad_norm: Any, rewards: Iterable[Any]) -> torch.Tensor:
        """``(3,)`` bool on the device: non-finite loss, gradient norm, any reward (no synchronisation)."""
        return torch.stack([
            _any_nonfinite([loss], self.device),
            _any_nonfinite([grad_norm], self.device),
            _any_nonfinite(list(rewards), self.device),
        ])

    def record(self, step: int, flags: torch.Tensor) -> None:
        """Remember ``step`` for the quantities flagged now (first occurrence only)."""
        step_t = torch.full_like(self.first_bad, int(step))
        self.first_bad = torch.where(flags & (self.first_bad == _NONE), step_t, self.first_bad)

    def check(self, accelerator: Any = None) -> None:
        """Synchronise (collective when distributed) and raise :class:`TrainingDiverged` if anything diverged."""
        first = self.first_bad
        if accelerator is not None and accelerator.num_processes > 1:
            first = accelerator.gather(first.unsqueeze(0)).min(dim=0).values
        values = first.cpu().tolist()
        bad = [(step, i) for i, step in enumerate(values) if step != _NONE]
        if bad:
            step, index = min(bad)  # the earliest step; at one step the loss before its gradient / reward
            raise TrainingDiverged(QUANTITIES[index], int(step))
