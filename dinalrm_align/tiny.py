"""Tiny, deterministic, fully offline diffusers pipelines for tests, the demo and benchmarks.

Everything is built in memory from configs (no hub access, no files). Each tiny pipeline keeps
the structural traits of its full-size model family that the rest of the package relies on:

* ``"sd3"`` (:func:`tiny_sd3_pipeline`, id ``tiny``): SD3.5-Medium-like ``StableDiffusion3Pipeline``;
  dual attention blocks (``attn2``) in the early layers, RMS qk-norm, a ``context_pre_only`` last
  block, two CLIP-with-projection encoders and a T5 encoder, SD3 VAE constants (shift 0.0609,
  scale 1.5305). Transformer inner dim 32 (4 heads x 8), 6 blocks (0-2 dual attention).
  Latents (B, 16, 32, 32) for 64x64 images; ``encode_prompt`` -> prompt_embeds (B, 77 + L, 32),
  negative (B, 77 + L, 32), pooled (B, 64), negative pooled (B, 64) (L = T5 max_sequence_length).
* ``"flux"`` (:func:`tiny_flux_pipeline`, id ``tiny-flux``): FLUX.1-dev-like ``FluxPipeline``
  (``guidance_embeds=False``: schnell-like); 4 double-stream + 2 single-stream blocks, inner dim 32
  (2 heads x 16, RoPE axes (4, 6, 6)), CLIPTextModel (hidden 32, pooled output used) + T5 (d_model
  32), FLUX VAE constants (shift 0.1159, scale 0.3611), FLUX.1-dev scheduler (dynamic shifting).
  ``output_type="latent"`` gives PACKED latents (B, (h/4)(w/4), 64) for an h x w image, i.e.
  (B, 256, 64) at 64x64 (unpacked (B, 16, 32, 32)); ``encode_prompt`` -> (prompt_embeds (B, L, 32),
  pooled (B, 32), text_ids (L, 3)), L = max_sequence_length (default 512).
* ``"zimage"`` (:func:`tiny_zimage_pipeline`, id ``tiny-zimage``): Z-Image-Turbo-like
  ``ZImagePipeline``; single-stream transformer dim 32 (2 heads x 16, RoPE axes (4, 6, 6), axes
  lengths (1024, 512, 512) so captions up to the default 512 tokens fit), 4 layers + 1 noise / 1
  context refiner, Qwen3Model text encoder (hidden 32, 2 layers; ``hidden_states[-2]`` is used)
  with a byte-level BPE Qwen2Tokenizer and a Qwen3-style chat template, FLUX VAE constants,
  Z-Image-Turbo scheduler (shift 3.0, no dynamic shifting). Latents (B, 16, h/2, w/2), i.e.
  (B, 16, 32, 32) at 64x64; ``encode_prompt`` -> (list of B tensors (L_i, 32), negatives: the same
  for "" prompts, or [] without CFG) where L_i is prompt i's templated token count (no padding).
  Note: ``ZImagePipeline`` rewrites a prompt *list* passed to it in place (each item becomes its
  chat-templated text).

All VAEs have 2 levels (factor 2), so 64x64 images <-> 32x32 latents. Parameters: transformer
sd3 255,504 / flux 211,072 / zimage 397,984 (297k of it is Z-Image's fixed 1024-wide timestep MLP);
VAE 48,827; text encoders 9,200 + 9,200 + 19,168 (sd3), 25,216 + 23,264 (flux), 31,264 (zimage).
The tokenizers know the colour-world words (:data:`TINY_WORDS`) as whole tokens, except that the
SD3 CLIP tokenizer (kept unchanged for reproducibility) splits "green", "cyan" and "tree".

Timings, measured on 2 CPU cores, 2026-12-02 (torch 2.13, one torch thread, median of 5-6 runs;
generation: 1 prompt, 4 steps, 64x64, ``output_type="pil"``, default guidance for SD3 (CFG) and
FLUX (embedded), ``guidance_scale=0`` for Z-Image; the first build in a process also pays ~3.3 s
of imports):

=========================  ======  ======  ======
seconds                    sd3     flux    zimage
=========================  ======  ======  ======
build                      0.026   0.022   0.022
4-step generation          0.15    0.09    0.04
=========================  ======  ======  ======
"""

from __future__ import annotations

from typing import Any

import torch

from dinalrm_align.tiny_pipelines import (
    QWEN_CHAT_TEMPLATE,
    TINY_IDS,
    TINY_REWARD_MODEL_SECTION,
    TINY_REWARD_SECTIONS,
    TINY_TRANSFORMER_KWARGS,
    TINY_WORDS,
    parse_tiny_id,
    tiny_flux_pipeline,
    tiny_pipeline,
    tiny_reward_model_config,
    tiny_sd3_pipeline,
    tiny_zimage_pipeline,
)

__all__ = [
    "QWEN_CHAT_TEMPLATE", "TINY_IDS", "TINY_REWARD_MODEL_SECTION", "TINY_REWARD_SECTIONS", "TINY_TRANSFORMER_KWARGS",
    "TINY_WORDS", "parse_tiny_id", "tiny_flux_pipeline", "tiny_pipeline", "tiny_reward_model", "tiny_reward_model_config",
    "tiny_sd3_pipeline", "tiny_zimage_pipeline",
]  # fmt: skip


def tiny_reward_model(
    backbone: Any = "sd3",
    pipe: Any = None,
    seed: int = 0,
    scheduler_config: dict[str, Any] | None = None,
    share_base_weights: bool = False,
    randomize_zero_init: bool = True,
    **overrides: Any,
) -> Any:
    """A fresh random tiny :class:`~dinalrm_align.reward_model.model.LatentRewardModel` of ``backbone``
    ("sd3", "flux", "zimage") on ``pipe``'s transformer (a pipeline or a transformer; default: a new tiny
    pipeline of that family with ``seed``). The reward model copies a strict subset of the transformer's
    blocks (two taps); the pipeline's own transformer is left intact.

    For backwards compatibility the first argument may also be a transformer (then its family is used).
    With ``randomize_zero_init`` the zero-initialised layers (FiLM outputs, value gates, LoRA ``B``) get
    small random values so that every part of the model influences the score.
    """
    from dinalrm_align.backbones.registry import adapter_for
    from dinalrm_align.reward_model.model import LatentRewardModel
    from dinalrm_align.reward_model.tiny_build import build_tiny_reward_model

    if isinstance(backbone, torch.nn.Module) or (backbone is not None and not isinstance(backbone, str)):
        pipe, backbone = backbone, None
    transformer = None
    if pipe is not None:
        transformer = getattr(pipe, "transformer", pipe)
        backbone = backbone or adapter_for(transformer).name
        if scheduler_config is None and hasattr(pipe, "scheduler"):
            scheduler_config = dict(pipe.scheduler.config)
    return build_tiny_reward_model(
        LatentRewardModel, backbone or "sd3", transformer, seed=seed, scheduler_config=scheduler_config,
        share_base_weights=share_base_weights, randomize_zero_init=randomize_zero_init, **overrides,
    )
