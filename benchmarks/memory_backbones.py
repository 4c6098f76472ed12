"""The policy families of the memory model: SD3.5-Medium, FLUX.1-dev and Z-Image-Turbo as ``Backbone`` s.

Each backbone builds its transformer (bf16 frozen base, policy LoRA r 32 / alpha 64 in fp32 on the family's
default targets), inputs (latents, noise, prompt conditioning as the family's text stack gives it), velocity
call, VAE, resident text encoders and DiNa-LRM with the family's reward config, all on the meta device.

* SD3.5-Medium: the released reward model (12 of 24 blocks), SD3 VAE, CLIP-L + CLIP-G + T5-XXL.
* FLUX.1-dev: all 19 double-stream blocks in the reward, FLUX AE, CLIP-L + T5-XXL; guidance-distilled
  (the guidance value is an input, no CFG).
* Z-Image-Turbo: both refiner pairs + main layers 0-15 in the reward, FLUX AE, Qwen3-4B; no CFG.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks import common as C
from benchmarks import families as fams
from benchmarks.memory_workloads import Backbone, Modules, Setting, cast_all

BACKBONES: tuple[str, ...] = ("sd3", "flux", "zimage")


def get_backbone(name: str, preset_name: str = "full") -> Backbone:
    """``sd3`` (any preset), ``flux`` / ``zimage`` (presets ``full`` and ``tiny``)."""
    if name == "sd3":
        return sd3_backbone(C.get_preset(preset_name))
    if name in fams.FAMILIES:
        return family_backbone(fams.get_family(name, preset_name))
    raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")


def _fp32(params: list[nn.Parameter]) -> list[nn.Parameter]:
    for p in params:  # trainable weights stay fp32 (mixed precision)
        p.data = p.data.float()
    return params


def sd3_backbone(preset: C.Preset) -> Backbone:
    """SD3 / SD3.5 (``preset.transformer``), its VAE, its three text encoders and DiNa-LRM."""

    def build_transformer(dtype: torch.dtype) -> nn.Module:
        return cast_all(C.build_transformer(preset), dtype)

    def add_lora(transformer: nn.Module) -> list[nn.Parameter]:
        return _fp32(C.add_policy_lora(transformer, preset))

    def inputs(setting: Setting, device: str) -> dict[str, Any]:
        x = C.sd3_inputs(preset, setting.resolution, setting.t5_length, batch=setting.batch, device=device,
                         dtype=setting.dtype)
        neg = C.sd3_inputs(preset, setting.resolution, setting.t5_length, batch=setting.batch, device=device,
                           dtype=setting.dtype)
        cond = {"prompt_embeds": x["prompt_embeds"], "pooled": x["pooled_prompt_embeds"]}
        negative = {"prompt_embeds": neg["prompt_embeds"], "pooled": neg["pooled_prompt_embeds"]}
        return {"latents": x["latents"].float(), "noise": x["noise"].float(), "cond": cond, "negative": negative}

    def velocity(transformer: nn.Module, z: torch.Tensor, sigma: float, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return C.transformer_velocity(transformer, z, cond["prompt_embeds"], cond["pooled"], sigma)

    def build_text_encoders(dtype: torch.dtype) -> Modules:
        if preset.name != "full":  # published sizes only; reduced presets have no matching encoders
            return {}
        return {k: cast_all(m, dtype) for k, m in C.build_sd3_text_encoders().items()}

    def build_latent_reward(base: nn.Module, dtype: torch.dtype, merged: bool, shared: bool) -> nn.Module:
        rm = C.build_reward_model(preset, base, device="meta", dtype=dtype, share_base_weights=shared)
        return rm.merge_reward_lora() if merged else rm

    def latent_score(rm: nn.Module, x0: torch.Tensor, x: dict[str, Any]) -> torch.Tensor:
        return rm.score(x0, prompt_embeds=x["cond"]["prompt_embeds"], pooled_prompt_embeds=x["cond"]["pooled"],
                        u=0.4, noise=x["noise"])

    return Backbone(
        name=f"SD3.5-Medium ({preset.name})" if preset.name != "full" else "SD3.5-Medium",
        build_transformer=build_transformer,
        add_lora=add_lora,
        inputs=inputs,
        velocity=velocity,
        build_vae=lambda dtype: cast_all(C.build_vae(preset), dtype),
        build_text_encoders=build_text_encoders,
        build_latent_reward=build_latent_reward,
        latent_score=latent_score,
        vlm_text_tokens=preset.vlm_text_tokens,
        extra={"preset": preset},
    )


def family_backbone(family: fams.Family) -> Backbone:
    """FLUX.1-dev or Z-Image-Turbo (``benchmarks.families``): transformer, FLUX AE, text encoders, DiNa-LRM."""
    pooled = family.pooled_width is not None

    def inputs(setting: Setting, device: str) -> dict[str, Any]:
        def one() -> dict[str, torch.Tensor]:
            x = fams.inputs(family, setting.resolution, setting.t5_length, batch=setting.batch, device=device,
                            dtype=setting.dtype)
            cond = {"prompt_embeds": x["prompt_embeds"]}
            if pooled:
                cond["pooled"] = x["pooled_prompt_embeds"]
            return {"latents": x["latents"].float(), "noise": x["noise"].float(), "cond": cond}

        x, neg = one(), one()
        return {**x, "negative": neg["cond"]}

    def velocity(transformer: nn.Module, z: torch.Tensor, sigma: float, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return fams.velocity(family, transformer, z, sigma, cond["prompt_embeds"], cond.get("pooled"))

    def build_text_encoders(dtype: torch.dtype) -> Modules:
        return {k: cast_all(m, dtype) for k, m in fams.build_text_encoders(family).items()}

    def build_latent_reward(base: nn.Module, dtype: torch.dtype, merged: bool, shared: bool) -> nn.Module:
        rm = fams.build_reward_model(family, base, device="meta", dtype=dtype, share_base_weights=shared)
        return rm.merge_reward_lora() if merged else rm

    def latent_score(rm: nn.Module, x0: torch.Tensor, x: dict[str, Any]) -> torch.Tensor:
        return rm.score(x0, prompt_embeds=x["cond"]["prompt_embeds"], pooled_prompt_embeds=x["cond"].get("pooled"),
                        u=0.4, noise=x["noise"])

    preset = family.preset
    return Backbone(
        name=family.label if preset.name == "full" else f"{family.label} ({preset.name})",
        build_transformer=lambda dtype: cast_all(fams.build_transformer(family), dtype),
        add_lora=lambda transformer: _fp32(fams.add_policy_lora(transformer, family)),
        inputs=inputs,
        velocity=velocity,
        build_vae=lambda dtype: cast_all(fams.build_vae(family), dtype),
        build_text_encoders=build_text_encoders,
        build_latent_reward=build_latent_reward,
        latent_score=latent_score,
        vlm_text_tokens=preset.vlm_text_tokens,
        text_encoders_label=family.text_encoders_label,
        extra={"preset": preset, "family": family},
    )
