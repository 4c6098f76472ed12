"""Plug-ins: the latent-reward protocol, composition, pixel bridge and trainer adapters.

=================================== =============================================================
name                                what it is
=================================== =============================================================
``LatentReward``                    protocol: ``reward(*, latents, prompt_embeds, pooled_prompt_embeds,
                                    prompts, metadata) -> (B,)`` float32, no grad
``DifferentiableLatentReward``      protocol: adds ``score_differentiable(...)`` (grad w.r.t. latents)
``DiNaLatentReward``                the local DiNa-LRM reward (both protocols)
``RemoteLatentReward``              the same over HTTP (``dinalrm-align serve``; never differentiable)
``CompositeReward``                 ``{name: scores, ..., "avg": weighted sum}``
``build_composite`` / ``RewardSpec`` composition from configs (identical configs built once)
``PixelBridge`` / ``images_to_latents`` decoded images -> the reward family's VAE latents -> score (slower)
``flow_grpo_reward``                Flow-GRPO / DiffusionNFT ``multi_score`` contract (images)
``flow_grpo_latent_reward``         the same, latent-native
``ddpo_reward_fn``                  trl DDPO / AlignProp ``reward_fn(images, prompts, metadata)``
``PointwiseLatentRewardModel``      Flow-Factory style class
``LatentRewardBackend``             UniRL style backend (+ differentiable capability)
``NoiseSeeding``                    per-sample seeding of the reward noise
``ScoreNormalization``              ``(raw + offset) / scale`` presets
``make_pickscore``                  PickScore on decoded images ``fn(images, prompts) -> (B,)`` (GRPO mix-in, proxy)
``PickScoreLatentReward``           the same on latents (VAE decode); built-in composition type ``"pickscore"``
=================================== =============================================================

Names are imported lazily (``import dinalrm_align.rewards`` loads no model code).
"""

from __future__ import annotations

from dinalrm_align._lazy import lazy_exports

_LAZY = {
    "LatentReward": "protocol",
    "DifferentiableLatentReward": "protocol",
    "DiNaLatentReward": "dinalrm",
    "RemoteLatentReward": "remote",
    "CompositeReward": "composition",
    "RewardSpec": "composition",
    "build_composite": "composition",
    "as_composite": "composition",
    "PixelBridge": "pixels",
    "images_to_latents": "pixels",
    "FlowGRPOReward": "flow_grpo",
    "FlowGRPOLatentReward": "flow_grpo",
    "flow_grpo_reward": "flow_grpo",
    "flow_grpo_latent_reward": "flow_grpo",
    "diffusion_nft_reward": "flow_grpo",
    "diffusion_nft_latent_reward": "flow_grpo",
    "DDPORewardFunction": "ddpo",
    "ddpo_reward_fn": "ddpo",
    "alignprop_reward_fn": "ddpo",
    "PointwiseLatentRewardModel": "frameworks",
    "LatentRewardBackend": "frameworks",
    "RewardModelOutput": "frameworks",
    "NoiseSeeding": "seeding",
    "ScoreNormalization": "normalization",
    "resolve_normalization": "normalization",
    "make_pickscore": "pickscore",
    "PickScore": "pickscore",
    "PickScoreLatentReward": "pickscore",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
