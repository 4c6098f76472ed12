"""Z-Image (``ZImagePipeline``, ``ZImageTransformer2DModel``), e.g. Z-Image-Turbo.

Facts used here:

* latents: 16-channel (FLUX AE) ``(z - shift) * scale`` from the VAE config; the transformer takes a list
  of per-sample ``(C, 1, h, w)`` tensors and patchifies 2x2; image tokens are padded to a multiple of 32.
* text: Qwen3 (chat template, penultimate hidden layer), a list of variable-length ``(L_i, 2560)``
  tensors (no pooled vector); inside the model each caption is padded to a multiple of 32 and the batch
  is padded to its longest, with attention masks.
* time: the model's convention is reversed: it takes ``t = 1 - sigma`` (scaled by 1000 inside) and its
  output is the negative of this package's velocity (``ZImagePipeline`` negates it too).
* CFG: ``ZImagePipeline(guidance_scale=g)`` computes ``pos + g (pos - neg)``, i.e. the standard
  convention's scale ``g + 1``; Z-Image-Turbo samples 8 steps without CFG.
* schedule: ``sigmas = linspace(1, 1/T, T)`` with the scheduler's static shift 3 (Turbo).
* the unified sequence of the main layers is ``[image tokens (padded); caption tokens (padded)]`` per
  sample; a tap keeps the real image tokens and the real caption tokens (``text_mask`` marks them).
* reward model (upstream configuration): main layers 0-15 of 30 plus both refiner pairs, taps
  4/8/12/16, reward LoRA r32 / alpha 64 on every attention projection (refiners too), head width 1536
  with an input projection from 3840, FiLM on the 256-wide time embedding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from dinalrm_align.backbones.base import BackboneAdapter, reward_head_defaults, sigma_vector
from dinalrm_align.backbones.conditioning import TextConditioning

__all__ = ["ZImageAdapter"]


def _seq_multiple() -> int:
    try:
        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

        return int(SEQ_MULTI_OF)
    except ImportError:  # pragma: no cover
        return 32


class ZImageAdapter(BackboneAdapter):
    name: ClassVar[str] = "zimage"
    pipeline_class_name: ClassVar[str] = "ZImagePipeline"
    transformer_class_name: ClassVar[str] = "ZImageTransformer2DModel"
    hub_id_prefixes: ClassVar[tuple[str, ...]] = ("tongyi-mai/z-image",)
    scheduler_defaults: ClassVar[dict[str, Any]] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
    default_model_id: ClassVar[str] = "Tongyi-MAI/Z-Image-Turbo"
    policy_lora_targets: ClassVar[tuple[str, ...]] = (
        "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
    )
    variable_length_text: ClassVar[bool] = True
    tap_list: ClassVar[str] = "layers"
    unused_modules: ClassVar[tuple[str, ...]] = ("all_final_layer",)
    reward_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    reward_defaults: ClassVar[dict[str, Any]] = {
        "backbone_model_id": "Tongyi-MAI/Z-Image-Turbo",
        "num_transformer_layers": 16,
        "visual_head_idx": [4, 8, 12, 16],
        "text_head_idx": [4, 8, 12, 16],
        "lora_config": {"r": 32, "lora_alpha": 64, "init_lora_weights": "gaussian"},
        "reward_head": reward_head_defaults(use_proj_in=True),
    }

    # ------------------------------------------------------------------ latents
    def latent_multiple(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.all_patch_size[0])

    def max_latent_side(self, transformer: torch.nn.Module) -> int | None:
        # RoPE tables hold axes_lens[1] rows / axes_lens[2] columns of image tokens
        lens = getattr(transformer.config, "axes_lens", None)
        return None if lens is None else int(min(lens[1], lens[2])) * self.latent_multiple(transformer)

    def max_text_length(self, transformer: torch.nn.Module) -> int | None:
        """Longest caption the RoPE table fits: caption positions run 1..padded length, the image frame
        takes the next one, all below ``axes_lens[0]`` (captions are padded to a multiple of 32)."""
        lens = getattr(transformer.config, "axes_lens", None)
        if lens is None:
            return None
        multiple = _seq_multiple()
        return ((int(lens[0]) - 2) // multiple) * multiple

    def resolution_multiple_hint(self, model_id: str) -> int | None:
        return 4 if model_id.startswith("tiny") else 16  # VAE factor (2 tiny / 8) x patch size 2

    # ------------------------------------------------------------------ text
    def encode_prompt(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> tuple[Any, Any]:
        # the pipeline rewrites a prompt list in place (chat template): give it a copy
        embeds, _ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length)
        return embeds, None

    def conditioning(self, prompt_embeds: Any, pooled_prompt_embeds: Any = None) -> TextConditioning:
        if pooled_prompt_embeds is not None:
            raise ValueError("Z-Image has no pooled text vector: pass pooled_prompt_embeds=None")
        if isinstance(prompt_embeds, torch.Tensor):
            if prompt_embeds.ndim != 3:
                raise ValueError(f"Z-Image prompt_embeds must be a list of (L_i, D) tensors or a (B, L, D) tensor, "
                                 f"got shape {tuple(prompt_embeds.shape)}")
            return TextConditioning(prompt_embeds)
        if isinstance(prompt_embeds, (list, tuple)):
            return TextConditioning.from_list(list(prompt_embeds))
        raise ValueError(f"Z-Image prompt_embeds must be a list of (L_i, D) tensors, got {type(prompt_embeds).__name__}")

    def text_width(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.cap_feat_dim)

    def check_conditioning(self, cond: TextConditioning, transformer: torch.nn.Module, batch: int) -> None:
        super().check_conditioning(cond, transformer, batch)
        limit = self.max_text_length(transformer)
        if limit is not None and cond.embeds.shape[1] > limit and max(cond.lengths()) > limit:
            raise ValueError(f"a Z-Image caption of {max(cond.lengths())} tokens exceeds the transformer's position "
                             f"grid: at most {limit} tokens")

    # ------------------------------------------------------------------ schedule
    def default_sigmas(self, num_steps: int) -> list[float] | None:
        return torch.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def scheduler_kwargs(self, scheduler_config: Mapping[str, Any], image_seq_len: int) -> dict[str, Any]:
        from dinalrm_align.sampling.schedule import resolution_shift

        return {"mu": resolution_shift(scheduler_config, image_seq_len)}

    def pipeline_guidance_kwargs(self, guidance_scale: float, embedded_guidance: float | None) -> dict[str, float]:
        # ZImagePipeline writes CFG as v_c + g (v_c - v_u): its g is our scale minus 1 (0 = off)
        return {"guidance_scale": max(float(guidance_scale) - 1.0, 0.0)}

    # ------------------------------------------------------------------ the transformer call
    def forward_kwargs(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, cond: TextConditioning, guidance: float | None = None
    ) -> dict[str, Any]:
        b = latents.shape[0]
        t1000 = sigma_vector(sigma, b, latents.device) * 1000.0
        return {
            "x": list(latents.unsqueeze(2).unbind(0)),
            "t": (1000.0 - t1000) / 1000.0,  # as ZImagePipeline: (1000 - timestep) / 1000 = 1 - sigma
            "cap_feats": cond.token_list(),
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
        out = transformer(**self.forward_kwargs(latents, sigma, cond), joint_attention_kwargs=joint_attention_kwargs,
                          return_dict=False)[0]
        return -torch.stack(list(out)).squeeze(2)

    # ------------------------------------------------------------------ the reward model's tapped forward
    def temb_module(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return transformer.t_embedder

    def token_dim(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.dim)

    def temb_dim(self, transformer: torch.nn.Module) -> int:
        return int(transformer.t_embedder.mlp[-1].out_features)

    def tap_meta(self, latents: torch.Tensor, cond: TextConditioning) -> dict[str, Any]:
        p = 2
        n_img = (latents.shape[-2] // p) * (latents.shape[-1] // p)
        multiple = _seq_multiple()
        return {"n_img": n_img, "x_len": math.ceil(n_img / multiple) * multiple, "lengths": cond.lengths()}

    def split_tap(self, output: Any, meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        unified = output
        image = unified[:, : meta["n_img"]]
        lengths, x_len = meta["lengths"], meta["x_len"]
        longest = max(lengths)
        text = unified.new_zeros(unified.shape[0], longest, unified.shape[-1])
        for i, n in enumerate(lengths):
            text[i, :n] = unified[i, x_len : x_len + n]
        if all(n == longest for n in lengths):
            return image, text, None
        mask = torch.arange(longest, device=unified.device)[None, :] < torch.tensor(lengths, device=unified.device)[:, None]
        return image, text, mask

    def split_tap_input(self, args: tuple[Any, ...], kwargs: dict[str, Any], meta: dict[str, Any]) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.split_tap(kwargs["x"] if "x" in kwargs else args[0], meta)
