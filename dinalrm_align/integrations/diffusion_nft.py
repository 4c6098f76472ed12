"""DiffusionNFT: the clean final latents it already stores, scored without a VAE.

DiffusionNFT is a fork of Flow-GRPO and keeps its reward contract unchanged: ``reward_fn = multi_score(device,
config.reward_fn)``, submitted to a thread pool as ``reward_fn(images, prompts, prompt_metadata,
only_strict=True)``, returning ``({name: scores, ..., "avg": weighted sum}, info)``. Its SD3 training
script stacks the sampler's trajectory to ``(B, T+1, C, h, w)`` and keeps only the clean final latents,
``latents[:, -1]``, for training (forward-process training re-noises them at the sampled timesteps), so a
latent reward needs nothing the trainer does not already hold.

What this module adds on top of :mod:`dinalrm_align.integrations.flow_grpo` is the entry point under
DiffusionNFT's name and the facts that matter there:

* NFT trains on a scalar per sample (``"avg"``): the DiNa-LRM score goes straight into its per-prompt
  advantage normalisation, so the normalisation preset (``"display"`` / ``"fork"`` / ``"raw"``) does not
  change training;
* NFT samples with a second LoRA adapter (``set_adapter("old")``) and computes its KL reference with
  ``disable_adapter()`` on the policy transformer. The reward model here owns its own copy of the
  backbone blocks (its LoRA is named ``rm_lora``), so switching or disabling the policy's adapters never
  changes a reward;
* NFT launches with ``torchrun`` and plain DDP (no accelerate): pass the local device explicitly
  (``device=torch.device("cuda", local_rank)``) when loading the reward by id.
"""

from __future__ import annotations

from typing import Any

from dinalrm_align.integrations.flow_grpo import FlowGRPOLatentReward, flow_grpo_latent_reward_fn

__all__ = ["diffusion_nft_latent_reward_fn"]


def diffusion_nft_latent_reward_fn(
    reward: Any,
    pipeline: Any = None,
    *,
    name: str = "dinalrm",
    backbone: str | None = None,
    height: int | None = None,
    width: int | None = None,
    **options: Any,
) -> FlowGRPOLatentReward:
    """The drop-in latent ``reward_fn`` for DiffusionNFT's SD3 script.

    Called as ``reward_fn(latents[:, -1], prompts, prompt_metadata, only_strict=True)`` (the same final latents
    the script stores as its clean latents), it returns ``({"dinalrm": f32[B], "avg": f32[B]}, {})``, every value
    a float32 ``(B,)`` numpy array. Arguments as
    :func:`~dinalrm_align.integrations.flow_grpo.flow_grpo_latent_reward_fn`: ``reward`` (id, folder, model,
    latent reward or composite), ``pipeline`` (the reward model's pipeline; may be the policy's), ``name``,
    ``backbone``, ``height``/``width`` (packed FLUX latents only) and the ``DiNaLatentReward`` options (``u``,
    ``normalization``, ``seeding``, ``n_noise``, ``max_sequence_length``, ``torch_dtype``, ``device``).
    To mix with NFT's own image rewards (its multi-reward config), wrap the result with
    :func:`~dinalrm_align.integrations.flow_grpo.flow_grpo_latent_multi_score`.
    """
    return flow_grpo_latent_reward_fn(
        reward, pipeline, name=name, backbone=backbone, height=height, width=width, **options
    )
