"""Alignment algorithms (ReFL, GRPO) and their pure math (``losses``, ``advantages``).

Kept import-light: the loss/advantage names below are imported lazily, and the algorithm
modules (``refl``, ``grpo``) are imported explicitly by whoever needs them.
"""

from __future__ import annotations

from dinalrm_align._lazy import lazy_exports

_LAZY = {
    "flow_matching_loss": "losses",
    "gaussian_mean_kl": "losses",
    "mix_regularized": "losses",
    "ppo_clip_loss": "losses",
    "refl_loss": "losses",
    "GroupStats": "advantages",
    "PromptGrouper": "advantages",
    "as_group_ids": "advantages",
    "clip_advantages": "advantages",
    "combine_advantages": "advantages",
    "group_advantages": "advantages",
    "group_stats": "advantages",
    "rank_slice": "advantages",
    "sum_then_normalize": "advantages",
    "zero_std_mask": "advantages",
    "zero_std_ratio": "advantages",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
