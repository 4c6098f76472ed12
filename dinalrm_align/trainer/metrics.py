"""Train-step metrics kept on the device until a log step (no host synchronisation in the hot path).

Values returned by ``Algorithm.train_step``: 0-d tensors / Python numbers are averaged over the batches
since the last log and over processes; 1-D tensors are per-sample values, gathered over processes and
logged as ``<key>_mean`` / ``<key>_std``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MetricBuffer"]


class MetricBuffer:
    """Accumulates train-step metrics between log steps."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[torch.Tensor]] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}

    def __bool__(self) -> bool:
        return bool(self.scalars or self.samples)

    def add(self, metrics: dict[str, Any], device: torch.device) -> None:
        for key, value in metrics.items():
            if torch.is_tensor(value) and value.ndim >= 1:
                self.samples.setdefault(key, []).append(value.detach().float().reshape(-1).to(device))
            else:
                self.scalars.setdefault(key, []).append(torch.as_tensor(value, dtype=torch.float32, device=device).detach())

    def merge(self, other: MetricBuffer) -> None:
        """Append ``other``'s values (e.g. those of one completed update) to this buffer."""
        for mine, theirs in ((self.scalars, other.scalars), (self.samples, other.samples)):
            for key, values in theirs.items():
                mine.setdefault(key, []).extend(values)

    def latest(self, key: str) -> torch.Tensor | None:
        """The last value of ``key`` (a device tensor), for the divergence check."""
        if key in self.scalars:
            return self.scalars[key][-1]
        if key in self.samples:
            return self.samples[key][-1]
        return None

    def rewards(self) -> list[torch.Tensor]:
        """Every per-sample or scalar value whose key starts with ``reward``."""
        return [v for store in (self.samples, self.scalars) for k, vs in store.items() if k.startswith("reward") for v in vs]

    def reduce(self, accelerator: Any) -> dict[str, float]:
        """Average / gather and move to the host (collective: every process must call it). Clears the buffer."""
        out: dict[str, float] = {}
        device = accelerator.device
        multi = accelerator.num_processes > 1
        if self.scalars:
            keys = sorted(self.scalars)
            local = torch.stack([torch.stack(self.scalars[k]).mean() for k in keys]).to(device)
            total = accelerator.reduce(local, reduction="mean") if multi else local
            out.update({k: float(v) for k, v in zip(keys, total.cpu().tolist())})
        for key in sorted(self.samples):
            values = torch.cat(self.samples[key]).to(device)
            if multi:
                values = accelerator.gather(values)
            values = values.cpu()
            out[f"{key}_mean"] = float(values.mean())
            out[f"{key}_std"] = float(values.std(unbiased=False))
        self.scalars.clear()
        self.samples.clear()
        return out
