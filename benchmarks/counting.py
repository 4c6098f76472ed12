"""FLOP counting and the other sizes the benchmarks report.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-accumulate;
matmuls, convolutions and attention only (elementwise ops, norms and resizes are not counted).
Also here: parameter counts, the meta-device workaround for the reward model's value checks, and the
ReFL rollout arithmetic (expected sampler steps when several graded steps share one rollout).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class FlopCount:
    """FLOPs of one measured call (2 per multiply-add), split into forward and backward."""

    forward: int
    backward: int = 0
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def to_dict(self) -> dict[str, Any]:
        return {"forward": self.forward, "backward": self.backward, "total": self.total, "by_op": self.by_op}


def count_flops(
    forward: Callable[[], torch.Tensor], backward: bool = False, grad_enabled: bool | None = None
) -> FlopCount:
    """FLOPs of ``forward()`` (and of ``forward().float().sum().backward()`` when ``backward``).

    ``grad_enabled`` defaults to ``backward`` (a forward-only count runs under ``no_grad``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    grad = backward if grad_enabled is None else grad_enabled
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(grad):
        out = forward()
        fwd = counter.get_total_flops()
        if backward:
            out.float().sum().backward()
    counts = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    total = counter.get_total_flops()
    return FlopCount(forward=int(fwd), backward=int(total - fwd), by_op=counts)


def module_forward_flops(forward: Callable[[], Any], prefixes: Sequence[str]) -> dict[str, int]:
    """Forward FLOPs attributed to modules whose qualified name matches one of ``prefixes``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward()
    out: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        for prefix in prefixes:
            if name == prefix:
                out[prefix] = int(sum(ops.values()))
    return out


def unused_output_flops(rm: nn.Module, forward: Callable[[], Any]) -> int:
    """Forward FLOPs of ``forward()`` spent in the reward backbone's output layers.

    ``rm.backbone`` is the family's own diffusers transformer, truncated after the last tapped block; its
    ``forward`` may still run the output layers (``rm.adapter.unused_modules``, e.g. SD3's ``norm_out`` and
    ``proj_out``) whose result the reward head never reads. 0 when they are not run.
    """
    root = type(rm.backbone).__name__
    prefixes = [f"{root}.{name}" for name in rm.adapter.unused_modules]
    return sum(module_forward_flops(forward, prefixes).values())


def param_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied tensors counted once)."""
    seen: set[int] = set()
    n = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def unique_param_bytes(*modules: nn.Module, bytes_per_param: int | None = None) -> int:
    """Bytes of the distinct parameter tensors of ``modules`` together (shared tensors once).

    Identity is the Python object (meta tensors have no storage); on real devices tensors that
    share a storage are also counted once.
    """
    seen_ids: set[int] = set()
    seen_ptrs: set[tuple[str, int]] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) in seen_ids:
                continue
            seen_ids.add(id(p))
            if p.device.type != "meta":
                key = (str(p.device), p.untyped_storage().data_ptr())
                if key in seen_ptrs:
                    continue
                seen_ptrs.add(key)
            total += p.numel() * (bytes_per_param if bytes_per_param is not None else p.element_size())
    return total


# --------------------------------------------------------------------------------------------
# Meta-device workaround for the project's input validation
# --------------------------------------------------------------------------------------------


class skip_finite_checks_on_meta:
    """Context manager: let ``validation.check_finite`` pass meta tensors.

    A meta tensor has no values, so "contains NaN/Inf" has no answer. The project's check skips meta
    tensors itself; this guard is only used if a call on meta tensors fails (a check that reads values).
    """

    def __enter__(self) -> skip_finite_checks_on_meta:
        from dinalrm_align.reward_model import validation

        self._module = validation
        self._original = validation.check_finite

        def check_finite(x: torch.Tensor, name: str) -> None:
            if isinstance(x, torch.Tensor) and x.device.type == "meta":
                return None
            return self._original(x, name)

        validation.check_finite = check_finite
        return self

    def __exit__(self, *exc: object) -> None:
        self._module.check_finite = self._original


# --------------------------------------------------------------------------------------------
# ReFL arithmetic
# --------------------------------------------------------------------------------------------


def expected_rollout_steps(k_low: int, k_high: int, graded_per_rollout: int = 1) -> float:
    """Expected no-grad sampler steps of one rollout when ``g`` graded steps branch from it.

    The rollout runs steps ``0..k_max-1`` where ``k_max`` is the largest of the ``g`` graded
    steps, drawn without replacement, uniformly from ``[k_low, k_high]`` (g = 1: the mean k).
    """
    values = list(range(k_low, k_high + 1))
    g = graded_per_rollout
    if not 1 <= g <= len(values):
        raise ValueError(f"graded_per_rollout must be in [1, {len(values)}], got {g}")
    n = len(values)
    total = math.comb(n, g)
    # P(max == values[i]) = C(i, g-1) / C(n, g)
    return sum(v * math.comb(i, g - 1) for i, v in enumerate(values)) / total
