"""Per-prompt (group) advantage normalisation for GRPO, pure tensor functions.

A *group* is the set of samples generated for the same prompt. Groups are usually spread across
ranks (Flow-GRPO's K-repeat sampler), so callers must **gather rewards and group ids from all ranks
first** (e.g. ``accelerator.gather``, which concatenates in rank order), compute advantages on the
gathered ``(N,)`` tensors, then take their own part back with :func:`rank_slice`. Since everything
here is per group, the result does not depend on how samples are ordered or split across ranks.

``group_ids`` may be: a sequence of hashables (e.g. prompt strings), a 1-D tensor of ids, or a 2-D
integer tensor whose rows identify the group (e.g. gathered prompt token ids).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import torch

__all__ = [
    "GroupStats",
    "PromptGrouper",
    "as_group_ids",
    "clip_advantages",
    "combine_advantages",
    "group_advantages",
    "group_stats",
    "rank_slice",
    "sum_then_normalize",
    "zero_std_mask",
    "zero_std_ratio",
    "GroupAdvantages",
    "compute_advantages",
]

GroupIds = torch.Tensor | Sequence[Hashable]


class PromptGrouper:
    """Maps prompts (any hashables) to integer group ids, stable across calls until :meth:`reset`.

    >>> g = PromptGrouper(); g(["a cat", "a dog", "a cat"]).tolist()
    [0, 1, 0]
    """

    def __init__(self) -> None:
        self._ids: dict[Hashable, int] = {}

    def __call__(self, prompts: Sequence[Hashable], device: torch.device | str | None = None) -> torch.Tensor:
        """Group ids ``(N,)`` int64 for ``prompts`` (new prompts get the next free id)."""
        if isinstance(prompts, (str, bytes)):
            raise ValueError("prompts must be a sequence of prompts, not a single string")
        out = [self._ids.setdefault(p, len(self._ids)) for p in prompts]
        return torch.tensor(out, dtype=torch.long, device=device)

    @property
    def num_groups(self) -> int:
        return len(self._ids)

    @property
    def prompts(self) -> list[Hashable]:
        """Known prompts, indexed by group id."""
        return list(self._ids)

    def reset(self) -> None:
        self._ids.clear()


def as_group_ids(group_ids: GroupIds, n: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """Normalise ``group_ids`` to ``(inverse (n,) int64 in [0, G), G)``."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.ndim not in (1, 2):
            raise ValueError(f"group_ids tensor must be 1-D (N,) or 2-D (N, L), got shape {tuple(group_ids.shape)}")
        if group_ids.ndim == 2 and group_ids.is_floating_point():
            raise ValueError("2-D group_ids must be integer token ids")
        if group_ids.shape[0] != n:
            raise ValueError(f"group_ids has {group_ids.shape[0]} entries, rewards have {n}")
        if group_ids.ndim == 2:
            uniq, inv = torch.unique(group_ids, dim=0, return_inverse=True)
        else:
            uniq, inv = torch.unique(group_ids, return_inverse=True)
        return inv.to(device=device, dtype=torch.long), int(uniq.shape[0])
    if isinstance(group_ids, (str, bytes)) or not isinstance(group_ids, Sequence):
        raise ValueError(f"group_ids must be a tensor or a sequence of hashables, got {type(group_ids).__name__}")
    if len(group_ids) != n:
        raise ValueError(f"group_ids has {len(group_ids)} entries, rewards have {n}")
    grouper = PromptGrouper()
    return grouper(group_ids, device=device), grouper.num_groups


class GroupStats(NamedTuple):
    """Per-group statistics (float64 ``(G,)``, population std) and the sample -> group map ``(N,)``."""

    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor
    inverse: torch.Tensor


def _rewards_1d(rewards: torch.Tensor, name: str = "rewards") -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor (N,), got {getattr(rewards, 'shape', type(rewards))}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return rewards


def group_stats(rewards: torch.Tensor, group_ids: GroupIds) -> GroupStats:
    """Mean, population std and size of each group of ``rewards`` ``(N,)``."""
    rewards = _rewards_1d(rewards)
    inv, num_groups = as_group_ids(group_ids, rewards.shape[0], device=rewards.device)
    r = rewards.double()
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, inv, r) / count
    var = torch.zeros_like(count).index_add_(0, inv, (r - mean[inv]) ** 2) / count
    return GroupStats(mean, var.sqrt(), count.long(), inv)


def group_advantages(
    rewards: torch.Tensor, group_ids: GroupIds, *, global_std: bool = False, eps: float = 1e-4
) -> torch.Tensor:
    """Per-group normalised advantages ``(r - mean_group) / (std + eps)`` -> float32 ``(N,)``.

    ``std`` is the population std of the sample's group, or of all ``rewards`` when ``global_std``
    (Flow-GRPO's ``global_std``). Groups of one sample (or constant groups) get advantage 0.
    Call on rewards gathered from all ranks (see the module docstring).
    """
    stats = group_stats(rewards, group_ids)
    r = rewards.double()
    centred = r - stats.mean[stats.inverse]
    std = r.std(unbiased=False) if global_std else stats.std[stats.inverse]
    return (centred / (std + eps)).to(torch.float32)


def zero_std_mask(rewards: torch.Tensor, group_ids: GroupIds, eps: float = 1e-6) -> torch.Tensor:
    """Bool ``(N,)``: True for samples whose group's reward std is ``<= eps`` (no learning signal).

    Flow-GRPO drops these samples before training; singleton groups count as zero-std.
    """
    stats = group_stats(rewards, group_ids)
    return (stats.std <= eps)[stats.inverse]


def zero_std_ratio(rewards: torch.Tensor, group_ids: GroupIds, eps: float = 1e-6) -> float:
    """Fraction of groups (prompts) whose reward std is ``<= eps``."""
    stats = group_stats(rewards, group_ids)
    return float((stats.std <= eps).double().mean())


def _check_components(per_component: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> None:
    if not weights:
        raise ValueError("weights must name at least one reward component")
    missing = sorted(set(weights) - set(per_component))
    if missing:
        raise ValueError(f"weights name unknown reward components {missing}; available: {sorted(per_component)}")
    shapes = {k: tuple(per_component[k].shape) for k in weights}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"reward components must share one shape (N,), got {shapes}")


def combine_advantages(
    per_component: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group_ids: GroupIds,
    global_std: bool = False,
    *,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``sum_k weights[k] * group_advantages(per_component[k])`` -> float32 ``(N,)``.

    Each component is normalised per group first, then weighted (DiNa-LRM recipe:
    ``{"dina_lrm": 1.0, "pickscore": 0.2}``). Components without a weight are ignored (log-only).
    """
    _check_components(per_component, weights)
    total: torch.Tensor | None = None
    for name, w in weights.items():
        adv = float(w) * group_advantages(per_component[name], group_ids, global_std=global_std, eps=eps)
        total = adv if total is None else total + adv
    assert total is not None
    return total


def sum_then_normalize(
    per_component: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group_ids: GroupIds,
    global_std: bool = False,
    *,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``group_advantages(sum_k weights[k] * per_component[k])`` -> float32 ``(N,)``.

    Alternative to :func:`combine_advantages` (Flow-GRPO's ``multi_score`` "avg"): raw rewards are
    weighted and summed, then normalised, so component scales matter.
    """
    _check_components(per_component, weights)
    total = sum(float(w) * per_component[name].double() for name, w in weights.items())
    assert isinstance(total, torch.Tensor)
    return group_advantages(total, group_ids, global_std=global_std, eps=eps)


def clip_advantages(adv: torch.Tensor, max_abs: float) -> torch.Tensor:
    """Clamp advantages to ``[-max_abs, max_abs]`` (Flow-GRPO ``adv_clip_max``, e.g. 5)."""
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    return adv.clamp(-max_abs, max_abs)


def rank_slice(gathered: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of a tensor gathered from ``world_size`` equal-sized rank chunks (rank order)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if gathered.shape[0] % world_size:
        raise ValueError(f"gathered batch {gathered.shape[0]} is not divisible by world_size {world_size}")
    per_rank = gathered.shape[0] // world_size
    return gathered[rank * per_rank : (rank + 1) * per_rank]


class GroupAdvantages(NamedTuple):
    """Advantages of one gathered epoch.

    Attributes:
        advantages: float32 ``(N,)``, clipped; exactly 0 for dropped samples.
        keep: bool ``(N,)``; False for samples of zero-std groups when filtering.
        zero_std_ratio: fraction of groups whose (weighted) rewards have zero std.
        num_groups: number of groups (distinct prompts).
    """

    advantages: torch.Tensor
    keep: torch.Tensor
    zero_std_ratio: float
    num_groups: int


def compute_advantages(
    components: Mapping[str, torch.Tensor],
    group_ids: GroupIds,
    weights: Mapping[str, float],
    *,
    mode: str = "per_component",
    global_std: bool = False,
    adv_clip_max: float | None = 5.0,
    filter_zero_std: bool = True,
    eps: float = 1e-4,
) -> GroupAdvantages:
    """Per-prompt GRPO advantages of rewards gathered from ALL processes.

    Args:
        components: ``{name: (N,) rewards}`` (same order as ``group_ids``).
        group_ids: ``(N,)`` ids (e.g. :func:`~dinalrm_align.trainer.grouping.prompt_group_ids`) or prompts.
        weights: ``{name: weight}``; zero weights are ignored.
        mode: ``per_component`` (:func:`combine_advantages`) or ``sum`` (:func:`sum_then_normalize`).
        global_std: one std over all samples instead of per group.
        adv_clip_max: clamp to ``+-adv_clip_max`` (None: no clipping).
        filter_zero_std: mark samples of zero-std groups as not kept (their advantage is 0 anyway).

    A group is zero-std when every weighted component (``per_component``) or the weighted sum
    (``sum``) is constant within it; groups of one sample count as zero-std.
    """
    used = {k: float(w) for k, w in weights.items() if w != 0}
    if not used:
        raise ValueError("weights must give at least one component a non-zero weight")
    missing = sorted(set(used) - set(components))
    if missing:
        raise ValueError(f"weights name components {missing} that were not computed; have {sorted(components)}")
    if mode == "per_component":
        adv = combine_advantages(components, used, group_ids, global_std, eps=eps)
        zero = None
        for name in used:
            z = zero_std_mask(components[name], group_ids)
            zero = z if zero is None else zero & z
        assert zero is not None
    elif mode == "sum":
        adv = sum_then_normalize(components, used, group_ids, global_std, eps=eps)
        total = sum(w * components[k].double() for k, w in used.items())
        assert isinstance(total, torch.Tensor)
        zero = zero_std_mask(total, group_ids)
    else:
        raise ValueError(f"advantage mode must be 'per_component' or 'sum', got {mode!r}")
    if adv_clip_max is not None:
        adv = clip_advantages(adv, adv_clip_max)
    n = adv.shape[0]
    inverse, num_groups = as_group_ids(group_ids, n, device=adv.device)
    zero_groups = torch.zeros(num_groups, dtype=torch.bool, device=adv.device)
    zero_groups[inverse[zero]] = True
    adv = torch.where(zero, torch.zeros_like(adv), adv)
    keep = ~zero if filter_zero_std else torch.ones_like(zero)
    return GroupAdvantages(adv, keep, float(zero_groups.float().mean()), num_groups)
