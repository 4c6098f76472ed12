"""Builders of the tiny, deterministic, fully offline diffusers pipelines and tiny reward-model configs.

A leaf module (imports nothing else of the package but the tiny tokenizers), so that backbone loading can
build tiny models without import circles. The public face, with the traits each tiny pipeline keeps of
its family, the shapes it produces and measured timings, is :mod:`dinalrm_align.tiny`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from dinalrm_align.tiny_tokenizers import (
    QWEN_CHAT_TEMPLATE,
    TINY_WORDS,
    _clip_tokenizer,
    _qwen_tokenizer,
    _t5_tokenizer,
)

__all__ = [
    "QWEN_CHAT_TEMPLATE", "TINY_IDS", "TINY_REWARD_MODEL_SECTION", "TINY_REWARD_SECTIONS", "TINY_TRANSFORMER_KWARGS",
    "TINY_WORDS", "parse_tiny_id", "tiny_flux_pipeline", "tiny_pipeline", "tiny_reward_model_config",
    "tiny_sd3_pipeline", "tiny_zimage_pipeline",
]  # fmt: skip

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import (
        AutoencoderKL,
        DiffusionPipeline,
        FluxPipeline,
        StableDiffusion3Pipeline,
        ZImagePipeline,
    )


#: ``SD3Transformer2DModel`` arguments of the tiny SD3 pipeline.
TINY_TRANSFORMER_KWARGS: dict[str, Any] = dict(
    sample_size=32, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
    pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0, 1, 2),
)  # fmt: skip

#: Tiny model ids (``model.pretrained`` / ``--model`` values) -> backbone name of :func:`tiny_pipeline`.
TINY_IDS: dict[str, str] = {"tiny": "sd3", "tiny-sd3": "sd3", "tiny-flux": "flux", "tiny-zimage": "zimage"}

def tiny_sd3_pipeline(seed: int = 0, num_layers: int = 6) -> StableDiffusion3Pipeline:
    """Build a random tiny SD3.5-style ``StableDiffusion3Pipeline`` (CPU, fp32, eval mode).

    Deterministic given ``seed``. 64x64 images, latents ``(B, 16, 32, 32)``.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    g_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        kwargs = dict(TINY_TRANSFORMER_KWARGS, num_layers=num_layers)
        kwargs["dual_attention_layers"] = tuple(
            i for i in kwargs["dual_attention_layers"] if i < num_layers - 1
        )
        transformer = SD3Transformer2DModel(**kwargs)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        tok = _clip_tokenizer()
        tok2 = _clip_tokenizer()
        clip_kwargs = dict(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="gelu",
        )
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_kwargs))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_kwargs))
        tok3 = _t5_tokenizer()
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tok3),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                dropout_rate=0.0,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tok,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tok2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tok3,
        )
    finally:
        torch.random.set_rng_state(g_state)
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.eval()
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for model construction and restore the caller's RNG state afterwards."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(state)


def _frozen(pipe: Any, names: tuple[str, ...]) -> Any:
    """Put the named components in eval mode without gradients; disable the progress bar."""
    for name in names:
        getattr(pipe, name).eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_vae() -> AutoencoderKL:
    """16-channel 2-level VAE (factor 2) with FLUX's latent constants: ``z = (mean - 0.1159) * 0.3611``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=64,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def tiny_flux_pipeline(
    seed: int = 0, guidance_embeds: bool = True, num_layers: int = 4, num_single_layers: int = 2
) -> FluxPipeline:
    """Random tiny FLUX.1-style ``FluxPipeline`` (CPU, fp32, frozen, eval mode), deterministic given ``seed``.

    ``guidance_embeds=True`` is FLUX.1-dev-like (distilled guidance input), ``False`` schnell-like.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = _clip_tokenizer(whole_words=True), _t5_tokenizer()
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
        vae = _flux_vae()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
            intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=77,
            hidden_act="quick_gelu",
        ))  # fmt: skip
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
            eos_token_id=1,
        ))  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip
    return _frozen(pipe, ("transformer", "vae", "text_encoder", "text_encoder_2"))


def tiny_zimage_pipeline(seed: int = 0, n_layers: int = 4) -> ZImagePipeline:
    """Random tiny Z-Image-Turbo-style ``ZImagePipeline`` (CPU, fp32, frozen, eval mode), deterministic."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = _qwen_tokenizer()
    with _seeded(seed):
        transformer = ZImageTransformer2DModel(
            all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=32, n_layers=n_layers,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
            axes_lens=[1024, 512, 512],
        )  # fmt: skip
        vae = _flux_vae()
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ))  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    return _frozen(pipe, ("transformer", "vae", "text_encoder"))


_BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "zimage": tiny_zimage_pipeline}


def tiny_pipeline(backbone: str = "sd3", seed: int = 0, **kwargs: Any) -> DiffusionPipeline:
    """A fresh tiny pipeline of ``backbone`` ("sd3", "flux" or "zimage"); ``kwargs`` go to its builder.

    CPU, fp32, eval mode, ``requires_grad`` off, progress bar off; same ``seed`` -> same weights.
    """
    if backbone not in _BUILDERS:
        raise ValueError(f"unknown tiny backbone {backbone!r}: expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[backbone](seed, **kwargs)


def parse_tiny_id(spec: str) -> tuple[str, int] | None:
    """``"tiny-flux:3"`` -> ``("flux", 3)``, ``"tiny"`` -> ``("sd3", 0)``; None if ``spec`` is not a tiny id.

    Specs that do not start with "tiny", or that contain a "/" (folders, hub ids), are not tiny ids.
    Raises ValueError for an unknown tiny name ("tiny-foo") or a seed that is not a non-negative integer.
    """
    if not spec.startswith("tiny") or "/" in spec or os.sep in spec:
        return None
    name, sep, seed = spec.partition(":")
    if name not in TINY_IDS:
        raise ValueError(
            f"unknown tiny model {spec!r}: expected one of {sorted(TINY_IDS)} (optionally ':SEED')"
        )
    if sep and not (seed.isascii() and seed.isdigit()):
        raise ValueError(f"bad seed in tiny model spec {spec!r}: expected '{name}:SEED' with SEED >= 0")
    return TINY_IDS[name], int(seed) if sep else 0


_TINY_HEAD = {"out_dim": 1, "num_queries": 4, "num_attn_heads": 4, "dropout": 0.0}

#: Model sections of the tiny reward models (same keys as a released ``config.json``): a strict subset of
#: the tiny pipeline's blocks, two taps, a rank-4 LoRA and a small head (with an input projection for
#: FLUX / Z-Image, as their full-size reward models have).
TINY_REWARD_SECTIONS: dict[str, dict[str, Any]] = {
    "sd3": {
        "backbone": "sd3", "backbone_model_id": "tiny", "num_transformer_layers": 4,
        "visual_head_idx": [2, 4], "text_head_idx": [2, 4],
        "reward_head": {"use_proj_in": False, "width": -1, **_TINY_HEAD},
    },
    "flux": {
        "backbone": "flux", "backbone_model_id": "tiny-flux", "num_transformer_layers": 4,
        "visual_head_idx": [2, 4], "text_head_idx": [2, 4],
        "reward_head": {"use_proj_in": True, "width": 16, **_TINY_HEAD},
    },
    "zimage": {
        "backbone": "zimage", "backbone_model_id": "tiny-zimage", "num_transformer_layers": 3,
        "visual_head_idx": [1, 3], "text_head_idx": [1, 3],
        "reward_head": {"use_proj_in": True, "width": 16, **_TINY_HEAD},
    },
}
_COMMON = {
    "model_type": "thurstone", "freeze_backbone": False, "use_lora": True, "use_text_features": True,
    "lora_config": {"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian"}, "use_logistic": False,
    "use_t_embed": True,
}
#: The SD3 tiny reward model's section (kept for existing callers).
TINY_REWARD_MODEL_SECTION: dict[str, Any] = {**_COMMON, **TINY_REWARD_SECTIONS["sd3"]}


def tiny_reward_model_config(backbone: str = "sd3", **overrides: Any) -> dict[str, Any]:
    """A full tiny reward-model config ``{"model": ..., "training": {"add_noise": True}}`` of ``backbone``.

    ``overrides`` update the model section (shallow).
    """
    import copy

    if backbone not in TINY_REWARD_SECTIONS:
        raise ValueError(f"unknown tiny backbone {backbone!r}: expected one of {sorted(TINY_REWARD_SECTIONS)}")
    model = copy.deepcopy({**_COMMON, **TINY_REWARD_SECTIONS[backbone]})
    model.update(overrides)
    return {"model": model, "training": {"add_noise": True}}
