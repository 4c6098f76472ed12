"""Drop-in integrations for the trainers people already run: the reward on their latents, no VAE.

======================================= ==================================================================
name                                    for
======================================= ==================================================================
``flow_grpo_latent_reward_fn``          Flow-GRPO ``reward_fn(latents[:, -1], prompts, metadata, only_strict=True)``
``flow_grpo_latent_multi_score``        Flow-GRPO ``{name: weight}`` mix of latent and image rewards
``diffusion_nft_latent_reward_fn``      DiffusionNFT (same contract as Flow-GRPO)
``dance_grpo_latent_reward_fn``         DanceGRPO sampling loop: ``reward_fn(latents, captions, height=, width=)``
``reward_regularised_loss``             diffusers flow-matching scripts: ``fm_loss - lambda * reward(x0_hat)``
``final_latents``                       trainer latents -> unpacked ``(B, C, h, w)`` with clear errors
======================================= ==================================================================

Guide with the exact lines to change in each trainer: ``docs/integrations.md``. Names are imported lazily.
"""

from __future__ import annotations

from dinalrm_align._lazy import lazy_exports

_LAZY = {
    "FlowGRPOLatentReward": "flow_grpo",
    "FlowGRPOLatentScorer": "flow_grpo",
    "FlowGRPOLatentMultiScore": "flow_grpo",
    "flow_grpo_latent_reward_fn": "flow_grpo",
    "flow_grpo_latent_multi_score": "flow_grpo",
    "diffusion_nft_latent_reward_fn": "diffusion_nft",
    "DanceGRPOLatentReward": "dance_grpo",
    "dance_grpo_latent_reward_fn": "dance_grpo",
    "RewardLoss": "diffusers_loss",
    "predicted_x0": "diffusers_loss",
    "reward_regularised_loss": "diffusers_loss",
    "LatentScoring": "common",
    "build_scoring": "common",
    "final_latents": "common",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
