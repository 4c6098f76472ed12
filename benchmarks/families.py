"""FLUX.1-dev and Z-Image-Turbo in the benchmarks: published configs, presets, builders, inputs, calls.

Published facts used here (no weights, no hub access):

* **FLUX.1-dev** -- ``FluxTransformer2DModel``: 19 double-stream + 38 single-stream blocks, 24 x 128 heads
  (width 3072), T5-XXL tokens (4096 wide) and the pooled CLIP-L vector (768), guidance-distilled (the
  guidance value 3.5 is an input; no CFG); 11.9 B parameters. Packed 2x2 latent tokens (64 channels).
  Sampling: 28 steps. Text stack: CLIP-L text tower (123 M) + T5-XXL encoder (4.76 B).
* **Z-Image-Turbo** -- ``ZImageTransformer2DModel``: 2 noise-refiner + 2 context-refiner + 30 main
  single-stream layers, width 3840 (30 x 128 heads), SwiGLU FFN (hidden 10240), adaLN on a 256-wide
  time embedding, Qwen3 captions (2560 wide, no pooled vector); 6.15 B parameters. Image and caption
  tokens are each padded to a multiple of 32. Sampling: 8 steps without CFG. Text stack: Qwen3-4B.
* Both decode with the FLUX AE: the SD3 VAE's architecture (16 latent channels, factor 8, no quant
  convs) with latent constants ``(z - 0.1159) * 0.3611``; decode FLOPs and memory equal the SD3 VAE's.
* Reward models: the families' upstream configurations (``RewardModelConfig.for_backbone``): FLUX all 19
  double-stream blocks (taps 8/12/16/19, LoRA r64 on the 8 joint-attention projections, head 1536 with
  an input projection from 3072); Z-Image both refiner pairs + main layers 0-15 (taps 4/8/12/16, LoRA r32
  on to_q/k/v/out, head 1536 with an input projection from 3840, FiLM on the 256-wide time embedding).
* Policies: LoRA r32 / alpha 64 on the adapter's default targets (the families' ReFL recipes), graded
  step k uniform in the last quarter of the schedule (FLUX [21, 27] of 28, Z-Image [4, 7] of 8).

Presets: ``full`` (published sizes) and ``tiny`` (the tiny pipelines' transformers and the tiny reward
configs of ``dinalrm_align.tiny_pipelines``, for the tests). The pixel scorers and the VAE's scale come
from the SD3 preset of the same name (``benchmarks.configs``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.builders import creation, frozen
from benchmarks.configs import SD3_T5_XXL_ENCODER, SD35_VAE, Preset, get_preset

#: FLUX.1-dev ``FluxTransformer2DModel`` (published config).
FLUX1_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
#: Z-Image-Turbo ``ZImageTransformer2DModel`` (published config; ``axes_lens`` only bounds the caption length).
ZIMAGE_TURBO_TRANSFORMER: dict[str, Any] = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)  # fmt: skip
#: FLUX AE latent constants (the architecture is SD35_VAE's).
FLUX_AE_SCALE, FLUX_AE_SHIFT = 0.3611, 0.1159
#: FLUX's CLIP-L text tower (``CLIPTextModel``; only its pooled output conditions the model).
FLUX_CLIP_L_TEXT: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
)  # fmt: skip
#: Qwen3-4B (Z-Image's text encoder; tied input/output embeddings).
QWEN3_4B: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True,
)  # fmt: skip

FAMILIES: tuple[str, ...] = ("flux", "zimage")


@dataclass
class Family:
    """One policy family at one preset: what to build and how its ReFL samples."""

    name: str  # adapter name: "flux" | "zimage"
    label: str  # "FLUX.1-dev" | "Z-Image-Turbo"
    transformer_class: str
    transformer: dict[str, Any]
    reward_model: dict[str, Any]  # the reward config's model section
    vae: dict[str, Any]
    preset: Preset  # SD3 preset of the same scale: pixel scorers, VAE factor, VLM text tokens
    num_steps: int
    k_low: int
    k_high: int
    embedded_guidance: float | None
    text_encoders_label: str
    policy_lora_r: int = 32

    @property
    def adapter(self) -> Any:
        from dinalrm_align.backbones.registry import get_adapter

        return get_adapter(self.name)

    def rm_config(self) -> dict[str, Any]:
        """Full config dict as ``LatentRewardModel.from_config`` takes it."""
        import copy

        return {"model": copy.deepcopy(self.reward_model), "training": {"add_noise": True}}

    @property
    def text_width(self) -> int:
        t = self.transformer
        return int(t["joint_attention_dim"] if self.name == "flux" else t["cap_feat_dim"])

    @property
    def pooled_width(self) -> int | None:
        return int(self.transformer["pooled_projection_dim"]) if self.name == "flux" else None

    @property
    def token_dim(self) -> int:
        t = self.transformer
        return int(t["num_attention_heads"] * t["attention_head_dim"]) if self.name == "flux" else int(t["dim"])


@functools.cache
def _tiny_transformer_kwargs(name: str) -> tuple[tuple[str, Any], ...]:
    """Constructor arguments of the tiny pipeline's transformer (built once, CPU, a few 10 k parameters)."""
    from dinalrm_align.tiny_pipelines import tiny_pipeline

    config = tiny_pipeline(name).transformer.config
    return tuple((k, v) for k, v in dict(config).items() if not k.startswith("_"))


def get_family(name: str, preset_name: str = "full") -> Family:
    """``flux`` | ``zimage`` at preset ``full`` | ``tiny`` (ValueError otherwise)."""
    from dinalrm_align.reward_model.config import RewardModelConfig

    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {list(FAMILIES)}")
    if preset_name not in ("full", "tiny"):
        raise ValueError(f"the {name} benchmarks have presets 'full' and 'tiny', not {preset_name!r}")
    preset = get_preset(preset_name)
    if preset_name == "full":
        transformer = dict(FLUX1_DEV_TRANSFORMER if name == "flux" else ZIMAGE_TURBO_TRANSFORMER)
        section = RewardModelConfig.for_backbone(name).model_section()
        vae = dict(SD35_VAE)
    else:
        from dinalrm_align.tiny_pipelines import tiny_reward_model_config

        transformer = dict(_tiny_transformer_kwargs(name))
        section = tiny_reward_model_config(name)["model"]
        vae = dict(preset.vae)
    vae.update(scaling_factor=FLUX_AE_SCALE, shift_factor=FLUX_AE_SHIFT)
    if name == "flux":
        return Family("flux", "FLUX.1-dev", "FluxTransformer2DModel", transformer, section, vae, preset,
                      num_steps=28, k_low=21, k_high=27, embedded_guidance=3.5,
                      text_encoders_label="CLIP-L and T5-XXL")
    return Family("zimage", "Z-Image-Turbo", "ZImageTransformer2DModel", transformer, section, vae, preset,
                  num_steps=8, k_low=4, k_high=7, embedded_guidance=None, text_encoders_label="Qwen3-4B")


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def build_transformer(family: Family, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """The family's diffusers transformer (random init on real devices), frozen, eval."""
    import diffusers

    with creation(device, dtype):
        model = getattr(diffusers, family.transformer_class)(**family.transformer)
    return frozen(model)


def add_policy_lora(transformer: nn.Module, family: Family) -> list[nn.Parameter]:
    """The ReFL policy LoRA (r, alpha = 2r, gaussian init, the adapter's default targets); returns its params."""
    from peft import LoraConfig

    r = family.policy_lora_r
    transformer.add_adapter(LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights="gaussian",
                                       target_modules=list(family.adapter.policy_lora_targets)))
    return [p for p in transformer.parameters() if p.requires_grad]


def build_reward_model(
    family: Family,
    transformer: nn.Module,
    device: str | torch.device | None = "meta",
    dtype: torch.dtype | None = None,
    share_base_weights: bool = False,
):
    """The project's ``LatentRewardModel.from_config`` with the family's reward config (frozen, eval)."""
    from dinalrm_align.reward_model.model import LatentRewardModel

    rm = LatentRewardModel.from_config(family.rm_config(), transformer=transformer,
                                       share_base_weights=share_base_weights, device=device, torch_dtype=dtype)
    return frozen(rm)


def build_vae(family: Family, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """The FLUX AE (``AutoencoderKL``) at the preset's scale, frozen, eval."""
    from diffusers import AutoencoderKL

    with creation(device, dtype):
        vae = AutoencoderKL(**family.vae)
    return frozen(vae)


def build_text_encoders(
    family: Family, device: str | torch.device = "meta", dtype: torch.dtype | None = None
) -> dict[str, nn.Module]:
    """The family's frozen text encoders at their published sizes (``{}`` below the full preset)."""
    if family.preset.name != "full":
        return {}
    with creation(device, dtype):
        if family.name == "flux":
            from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

            encoders = {"clip_l": CLIPTextModel(CLIPTextConfig(**FLUX_CLIP_L_TEXT)),
                        "t5_xxl": T5EncoderModel(T5Config(**SD3_T5_XXL_ENCODER))}
        else:
            from transformers import Qwen3Config, Qwen3Model

            encoders = {"qwen3_4b": Qwen3Model(Qwen3Config(**QWEN3_4B))}
    return {k: frozen(m) for k, m in encoders.items()}


# --------------------------------------------------------------------------------------------
# Inputs and calls
# --------------------------------------------------------------------------------------------


def inputs(
    family: Family,
    resolution: int,
    text_length: int,
    batch: int = 1,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor | None]:
    """Latents and noise (B, 16, H/8, W/8) unpacked, ``prompt_embeds`` (B, L, D_text) and
    ``pooled_prompt_embeds`` (B, 768) for FLUX, None for Z-Image (every caption ``text_length`` tokens long)."""
    h = resolution // family.preset.vae_factor

    def rnd(*shape: int) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    pooled = family.pooled_width
    return {
        "latents": rnd(batch, 16, h, h),
        "noise": rnd(batch, 16, h, h),
        "prompt_embeds": rnd(batch, text_length, family.text_width),
        "pooled_prompt_embeds": None if pooled is None else rnd(batch, pooled),
    }


def velocity(
    family: Family,
    transformer: nn.Module,
    latents: torch.Tensor,
    sigma: float,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor | None,
) -> torch.Tensor:
    """One transformer call at noise level ``sigma`` through the project's adapter (the family's time
    convention, packing and embedded guidance): velocity (B, 16, h, w)."""
    from dinalrm_align.backbones.conditioning import TextConditioning

    cond = TextConditioning(prompt_embeds, pooled)
    return family.adapter.velocity(transformer, latents, sigma, cond, guidance=family.embedded_guidance)


def sequence_tokens(family: Family, resolution: int, text_length: int) -> tuple[int, int]:
    """``(image tokens, text tokens)`` the transformer blocks see (Z-Image: each padded to a multiple of 32)."""
    n = (resolution // family.preset.vae_factor // 2) ** 2
    if family.name == "zimage":
        return -(-n // 32) * 32, -(-text_length // 32) * 32
    return n, text_length
