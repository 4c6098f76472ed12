"""FLUX.1 (``FluxPipeline``, ``FluxTransformer2DModel``): FLUX.1-dev (guidance-distilled) and schnell.

Facts used here:

* latents: 16-channel FLUX AE, ``(z - 0.1159) * 0.3611`` (read from the VAE config); the transformer
  takes them *packed*: each 2x2 patch becomes one 64-channel token (channel order c, dy, dx), with
  position ids ``[0, row, col]`` for image tokens and all-zero ids for text tokens. Latent sides must be
  even; the pipeline's ``output_type="latent"`` returns the packed tokens (see
  :meth:`FluxAdapter.unpack_pipeline_latents`).
* text: CLIP-L's pooled output ``(B, 768)`` and T5-XXL tokens ``(B, L, 4096)`` (no mask).
* time: the transformer takes ``timestep = sigma`` and multiplies by 1000 inside; FLUX.1-dev also takes
  the distilled guidance value (3.5 by default), likewise scaled inside. Classifier-free guidance is
  not used with guidance-distilled models.
* schedule: ``sigmas = linspace(1, 1/T, T)`` shifted by the resolution-dependent ``mu`` (dynamic shifting),
  as ``FluxPipeline`` sets it.
* reward model (upstream configuration): all 19 double-stream blocks, no single-stream block, taps
  8/12/16/19, reward LoRA r64 / alpha 128 on the 8 joint-attention projections, head width 1536 with
  an input projection from 3072.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from dinalrm_align.backbones.base import BackboneAdapter, reward_head_defaults, sigma_vector
from dinalrm_align.backbones.conditioning import TextConditioning

__all__ = ["FluxAdapter", "image_ids", "pack_latents", "unpack_latents"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, (h/2)(w/2), 4C)`` (2x2 patches, channel order c, dy, dx)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``(B, (h/2)(w/2), 4C)`` -> ``(B, C, h, w)``."""
    b, n, d = tokens.shape
    if n != (h // 2) * (w // 2):
        raise ValueError(f"{n} packed tokens do not fit a {h}x{w} latent ({(h // 2) * (w // 2)} expected)")
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h2: int, w2: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids ``(h2 * w2, 3)`` of the packed image tokens: ``[0, row, col]``."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


class FluxAdapter(BackboneAdapter):
    name: ClassVar[str] = "flux"
    pipeline_class_name: ClassVar[str] = "FluxPipeline"
    transformer_class_name: ClassVar[str] = "FluxTransformer2DModel"
    hub_id_prefixes: ClassVar[tuple[str, ...]] = ("black-forest-labs/flux.1",)
    #: FLUX.1-dev's scheduler: dynamic (resolution-dependent) shifting, so the training table is unshifted
    scheduler_defaults: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
        "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
    }
    default_model_id: ClassVar[str] = "black-forest-labs/FLUX.1-dev"
    policy_lora_targets: ClassVar[tuple[str, ...]] = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )
    tap_list: ClassVar[str] = "transformer_blocks"
    dropped_lists: ClassVar[tuple[str, ...]] = ("single_transformer_blocks",)
    reward_lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    context_projections: ClassVar[tuple[str, ...]] = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    default_embedded_guidance: ClassVar[float | None] = 3.5
    reward_defaults: ClassVar[dict[str, Any]] = {
        "backbone_model_id": "black-forest-labs/FLUX.1-dev",
        "num_transformer_layers": 19,
        "visual_head_idx": [8, 12, 16, 19],
        "text_head_idx": [8, 12, 16, 19],
        "lora_config": {"r": 64, "lora_alpha": 128, "init_lora_weights": "gaussian"},
        "reward_head": reward_head_defaults(use_proj_in=True),
    }

    # ------------------------------------------------------------------ latents
    def latent_channels(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.in_channels) // 4

    def latent_multiple(self, transformer: torch.nn.Module) -> int:
        return 2  # 2x2 packing

    def unpack_pipeline_latents(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if latents.ndim == 4:
            return latents
        factor = self.vae_scale_factor(pipe)
        return unpack_latents(latents, 2 * (height // (factor * 2)), 2 * (width // (factor * 2)))

    # ------------------------------------------------------------------ text
    def encode_prompt(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> tuple[Any, Any]:
        pe, pooled, _text_ids = pipe.encode_prompt(prompt=list(prompts), prompt_2=None,
                                                   max_sequence_length=max_sequence_length)
        return pe, pooled

    def conditioning(self, prompt_embeds: Any, pooled_prompt_embeds: Any = None) -> TextConditioning:
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
            raise ValueError(
                f"FLUX prompt_embeds must be a (B, L, D) tensor of T5 tokens, got "
                f"{getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}"
            )
        if not isinstance(pooled_prompt_embeds, torch.Tensor) or pooled_prompt_embeds.ndim != 2:
            raise ValueError(
                "FLUX needs pooled_prompt_embeds, the (B, 768) pooled CLIP vector, got "
                f"{getattr(pooled_prompt_embeds, 'shape', type(pooled_prompt_embeds).__name__)}"
            )
        if pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(f"batch sizes disagree: prompt_embeds {prompt_embeds.shape[0]}, pooled "
                             f"{pooled_prompt_embeds.shape[0]}")
        return TextConditioning(prompt_embeds, pooled_prompt_embeds, None)

    def text_width(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.joint_attention_dim)

    def pooled_width(self, transformer: torch.nn.Module) -> int | None:
        return int(transformer.config.pooled_projection_dim)

    # ------------------------------------------------------------------ schedule
    def default_sigmas(self, num_steps: int) -> list[float] | None:
        import numpy as np

        return np.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def scheduler_kwargs(self, scheduler_config: Mapping[str, Any], image_seq_len: int) -> dict[str, Any]:
        from dinalrm_align.sampling.schedule import resolution_shift

        return {"mu": resolution_shift(scheduler_config, image_seq_len)}

    # ------------------------------------------------------------------ the transformer call
    def guidance_distilled_hint(self, model_id: str) -> bool | None:
        spec = model_id.lower()
        if spec.startswith("tiny") or "flux.1-dev" in spec:
            return True
        return False if "schnell" in spec else None

    def resolution_multiple_hint(self, model_id: str) -> int | None:
        return 4 if model_id.startswith("tiny") else 16  # VAE factor (2 tiny / 8) x the 2x2 packing

    def pipeline_guidance_kwargs(self, guidance_scale: float, embedded_guidance: float | None) -> dict[str, float]:
        # FluxPipeline's guidance_scale is the embedded guidance (no CFG; true CFG is a separate option)
        return {"guidance_scale": float(self.default_embedded_guidance if embedded_guidance is None else embedded_guidance)}

    def guidance_embedded(self, transformer: torch.nn.Module) -> bool:
        return bool(getattr(transformer.config, "guidance_embeds", False))

    def forward_kwargs(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, cond: TextConditioning, guidance: float | None = None
    ) -> dict[str, Any]:
        b, _, h, w = latents.shape
        # as FluxPipeline: the scheduler timestep (1000 sigma) in the latents' dtype, divided by 1000
        timestep = (sigma_vector(sigma, b, latents.device) * 1000.0).to(latents.dtype) / 1000
        kwargs: dict[str, Any] = {
            "hidden_states": pack_latents(latents),
            "timestep": timestep,
            "pooled_projections": cond.pooled,
            "encoder_hidden_states": cond.embeds,
            "txt_ids": torch.zeros(cond.embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
            "img_ids": image_ids(h // 2, w // 2, latents.device, latents.dtype),
        }
        if guidance is not None:
            kwargs["guidance"] = torch.full((b,), float(guidance), device=latents.device, dtype=torch.float32)
        return kwargs

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
        h, w = latents.shape[-2:]
        config = getattr(getattr(transformer, "module", transformer), "config", None)  # DDP / DeepSpeed wrap it
        if config is not None:
            if not getattr(config, "guidance_embeds", False):
                guidance = None  # as FluxPipeline: schnell-like models take no guidance input
            elif guidance is None:
                raise ValueError(
                    "this FLUX transformer is guidance-distilled (FLUX.1-dev): it needs the embedded guidance value "
                    f"as an input, e.g. guidance={self.default_embedded_guidance}"
                )
        kwargs = self.forward_kwargs(latents, sigma, cond, guidance)
        out = transformer(**kwargs, joint_attention_kwargs=joint_attention_kwargs, return_dict=False)[0]
        return unpack_latents(out, h, w)
