"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``).

Facts used here:

* latents ``(B, 16, H/8, W/8)``, ``(z - 0.0609) * 1.5305`` for SD3.5 (read from the VAE config);
  patch size 2, at most ``pos_embed_max_size * 2`` latent pixels a side (384 * 2 = 768 for SD3.5-M);
* text: CLIP-L + CLIP-G penultimate states (77 tokens, channels zero-padded to the T5 width) followed
  by T5-XXL (``max_sequence_length`` tokens, no mask) -> ``(B, 77 + L, 4096)``; pooled ``(B, 2048)``;
* time: the transformer takes ``timestep = 1000 * sigma``;
* schedule: the scheduler's own spacing (shift 3, static), as ``StableDiffusion3Pipeline`` calls it;
* policy LoRA: the joint-attention projections (``attn.`` keeps the image-only ``attn2`` frozen).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from dinalrm_align.backbones.base import BackboneAdapter, sigma_vector
from dinalrm_align.backbones.conditioning import TextConditioning


class SD3Adapter(BackboneAdapter):
    name: ClassVar[str] = "sd3"
    pipeline_class_name: ClassVar[str] = "StableDiffusion3Pipeline"
    transformer_class_name: ClassVar[str] = "SD3Transformer2DModel"
    hub_id_prefixes: ClassVar[tuple[str, ...]] = ("stabilityai/stable-diffusion-3",)
    default_model_id: ClassVar[str] = "stabilityai/stable-diffusion-3.5-medium"
    policy_lora_targets: ClassVar[tuple[str, ...]] = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )
    # Suffix targets: in the dual-attention blocks they also hit the image-only ``attn2`` projections.
    reward_lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    context_projections: ClassVar[tuple[str, ...]] = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    reward_defaults: ClassVar[dict[str, Any]] = {
        "backbone_model_id": "stabilityai/stable-diffusion-3.5-medium",
        "num_transformer_layers": 12,
        "visual_head_idx": [4, 8, 12],
        "text_head_idx": [4, 8, 12],
        "lora_config": {"r": 64, "lora_alpha": 128, "init_lora_weights": "gaussian"},
        "reward_head": {"use_proj_in": False, "width": -1, "out_dim": 1, "num_queries": 4, "num_attn_heads": 8,
                        "dropout": 0.0},
    }

    # ------------------------------------------------------------------ latents
    def max_latent_side(self, transformer: torch.nn.Module) -> int | None:
        size = getattr(transformer.config, "pos_embed_max_size", None)
        return None if size is None else int(size) * self.latent_multiple(transformer)

    def resolution_multiple_hint(self, model_id: str) -> int | None:
        return 4 if model_id.startswith("tiny") else 16  # VAE factor (2 tiny / 8) x patch size 2

    # ------------------------------------------------------------------ text
    def encode_prompt(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> tuple[Any, Any]:
        pe, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
        )
        return pe, pooled

    def conditioning(self, prompt_embeds: Any, pooled_prompt_embeds: Any = None) -> TextConditioning:
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
            raise ValueError(
                f"SD3 prompt_embeds must be a (B, 77 + L, D) tensor, got {getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}"
            )
        if not isinstance(pooled_prompt_embeds, torch.Tensor) or pooled_prompt_embeds.ndim != 2:
            raise ValueError(
                "SD3 needs pooled_prompt_embeds, a (B, P) tensor, got "
                f"{getattr(pooled_prompt_embeds, 'shape', type(pooled_prompt_embeds).__name__)}"
            )
        if pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(
                f"batch sizes disagree: prompt_embeds {prompt_embeds.shape[0]}, pooled_prompt_embeds "
                f"{pooled_prompt_embeds.shape[0]}"
            )
        return TextConditioning(prompt_embeds, pooled_prompt_embeds, None)

    def text_width(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.joint_attention_dim)

    def pooled_width(self, transformer: torch.nn.Module) -> int | None:
        return int(transformer.config.pooled_projection_dim)

    # ------------------------------------------------------------------ schedule
    def scheduler_kwargs(self, scheduler_config: Mapping[str, Any], image_seq_len: int) -> dict[str, Any]:
        from dinalrm_align.sampling.schedule import resolution_shift

        if scheduler_config.get("use_dynamic_shifting", False):
            return {"mu": resolution_shift(scheduler_config, image_seq_len)}
        return {}

    # ------------------------------------------------------------------ the transformer call
    def forward_kwargs(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, cond: TextConditioning, guidance: float | None = None
    ) -> dict[str, Any]:
        """Keyword arguments of ``SD3Transformer2DModel.forward`` at noise level ``sigma`` (timestep 1000 sigma)."""
        timestep = sigma_vector(sigma, latents.shape[0], latents.device) * 1000.0
        return {
            "hidden_states": latents,
            "timestep": timestep,
            "encoder_hidden_states": cond.embeds,
            "pooled_projections": cond.pooled,
        }

    def velocity(
        self,
        transformer: Any,
        latents: torch.Tensor,
        sigma: float | torch.Tensor,
        cond: TextConditioning,
        *,
        guidance: float | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        kwargs = self.forward_kwargs(latents, sigma, cond, guidance)
        return transformer(**kwargs, joint_attention_kwargs=joint_attention_kwargs, return_dict=False)[0]
