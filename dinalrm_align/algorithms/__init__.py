"""Training algorithms of the one trainer (ReFL, GRPO; reward-model training lives in ``rm_training``)
and their pure math (``losses``, ``advantages``).

``registry`` (leaf: name -> algorithm), ``base`` (the :class:`Algorithm` interface), ``policy`` (what ReFL and
GRPO share: building the policy and its reward, evaluation, saving), ``reward_scorer`` (the frozen reward,
latent or through the pixel bridge), ``refl``, ``grpo`` (+ ``grpo_config``, ``grpo_rollout``). Kept
import-light: the names below are imported lazily.
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
    "compute_advantages": "advantages",
    "GroupAdvantages": "advantages",
    "register_algorithm": "registry",
    "resolve_algorithm": "registry",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
