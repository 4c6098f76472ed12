"""Builders of the benchmark models (any device, meta included), their inputs and their plain calls.

Models are built frozen and in eval mode, with parameters created directly on the requested device
and dtype (``device="meta"``: real shapes, no memory). Conventions: latents are SD3-normalised
``(z - shift) * scale``; images leave the VAE in [-1, 1] and are mapped to [0, 1] before a scorer's
own preprocessing (``benchmarks.scorers``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from benchmarks.configs import (
    POLICY_LORA_TARGETS,
    SD3_CLIP_G_TEXT,
    SD3_CLIP_L_TEXT,
    SD3_T5_XXL_ENCODER,
    Preset,
)


@contextlib.contextmanager
def creation(device: str | torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (no fp32 copy, no cast warnings)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def frozen(module: nn.Module) -> nn.Module:
    """``module`` without gradients, in eval mode."""
    module.requires_grad_(False)
    return module.eval()


def build_transformer(preset: Preset, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """SD3 ``SD3Transformer2DModel`` of the preset (random init on real devices), frozen, eval."""
    from diffusers import SD3Transformer2DModel

    with creation(device, dtype):
        model = SD3Transformer2DModel(**preset.transformer)
    return frozen(model)


def add_policy_lora(transformer: nn.Module, preset: Preset) -> list[nn.Parameter]:
    """The ReFL policy LoRA (r, alpha = 2r, gaussian init, joint attention only); returns its params."""
    from peft import LoraConfig

    r = preset.policy_lora_r
    transformer.add_adapter(
        LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights="gaussian", target_modules=list(POLICY_LORA_TARGETS))
    )
    return [p for p in transformer.parameters() if p.requires_grad]


def build_vae(preset: Preset, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """SD3-style 16-channel ``AutoencoderKL`` of the preset, frozen, eval."""
    from diffusers import AutoencoderKL

    with creation(device, dtype):
        vae = AutoencoderKL(**preset.vae)
    return frozen(vae)


def build_clip(preset: Preset, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """CLIP image-text model of the preset (ViT-H/14 at full size), frozen, eval, SDPA attention."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**copy.deepcopy(preset.clip))
    config._attn_implementation = "sdpa"
    with creation(device, dtype):
        model = CLIPModel(config)
    return frozen(model)


def build_vlm(preset: Preset, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """Qwen2-VL model of the preset (7B at full size), frozen, eval, SDPA attention."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(**copy.deepcopy(preset.vlm))
    config._attn_implementation = "sdpa"
    with creation(device, dtype):
        model = Qwen2VLForConditionalGeneration(config)
        # HPSv3-style reward head on the last hidden state (the vocabulary head is never used).
        model.reward_head = nn.Linear(config.text_config.hidden_size, 2)
    return frozen(model)


def build_sd3_text_encoders(
    device: str | torch.device = "meta", dtype: torch.dtype | None = None
) -> dict[str, nn.Module]:
    """The three SD3 / SD3.5 text encoders at their published sizes, frozen, eval.

    Keys ``clip_l``, ``clip_g``, ``t5_xxl``. No preset: they are not shrunk with the others (the
    benchmarks only need their size, on the meta device).
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with creation(device, dtype):
        encoders = {
            "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_L_TEXT)),
            "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_G_TEXT)),
            "t5_xxl": T5EncoderModel(T5Config(**SD3_T5_XXL_ENCODER)),
        }
    return {name: frozen(m) for name, m in encoders.items()}


def build_reward_model(
    preset: Preset,
    transformer: nn.Module,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    share_base_weights: bool = False,
):
    """The project's ``LatentRewardModel.from_config`` on ``transformer`` (frozen, eval).

    ``rm.backbone`` is the model's own truncated copy of ``transformer`` (its first
    ``num_transformer_layers`` blocks; base tensors tied to ``transformer``'s with ``share_base_weights``).
    On the meta device the head/LoRA are created on the CPU by ``from_config`` and then moved.
    """
    from dinalrm_align.reward_model.model import LatentRewardModel

    rm = LatentRewardModel.from_config(
        preset.rm_config(), transformer=transformer, share_base_weights=share_base_weights,
        device=device, torch_dtype=dtype,
    )
    return frozen(rm)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def text_tokens(t5_length: int) -> int:
    """SD3 joint text sequence: 77 CLIP tokens + the T5 length."""
    return 77 + int(t5_length)


def sd3_inputs(
    preset: Preset,
    resolution: int,
    t5_length: int,
    batch: int = 1,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Random latents (B,16,H/8,W/8), prompt embeds (B,77+L,D_joint), pooled (B,D_pooled), noise."""
    h = resolution // preset.vae_factor
    t = preset.transformer

    def rnd(*shape: int) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    return {
        "latents": rnd(batch, t["in_channels"], h, h),
        "noise": rnd(batch, t["in_channels"], h, h),
        "prompt_embeds": rnd(batch, text_tokens(t5_length), t["joint_attention_dim"]),
        "pooled_prompt_embeds": rnd(batch, t["pooled_projection_dim"]),
    }


# --------------------------------------------------------------------------------------------
# Model calls shared by the benchmarks
# --------------------------------------------------------------------------------------------


def transformer_velocity(
    transformer: nn.Module, latents: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, sigma: float
) -> torch.Tensor:
    """One SD3 transformer call at noise level ``sigma`` (timestep 1000 sigma)."""
    timestep = torch.full((latents.shape[0],), 1000.0 * sigma, device=latents.device, dtype=latents.dtype)
    return transformer(
        hidden_states=latents,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        timestep=timestep,
        return_dict=False,
    )[0]


def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """SD3-normalised latents -> images in [0, 1] (B, 3, H, W)."""
    cfg = vae.config
    images = vae.decode(latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    return (images * 0.5 + 0.5).clamp(0, 1)
