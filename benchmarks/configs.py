"""Published architecture configs of the benchmarks and the presets that scale them.

Every model is described by its published hyper-parameters (no hub access, no weights): the
SD3.5-Medium MMDiT-X transformer and its 16-channel VAE (diffusers), the released DiNa-LRM config,
a CLIP ViT-H/14 image-text model (PickScore / HPSv2 class), a Qwen2-VL-7B vision-language model
(HPSv3 class) and the SD3 text encoders (transformers). FLUX.1-dev and Z-Image-Turbo live in
``benchmarks.families``.

Three presets share one code path:

``full``   the published sizes (FLOPs on meta; the GPU benchmark).
``small``  every width divided by 8, every depth and token count kept ("matched reduced size"
           for the CPU benchmark: the same graph, ~1/64 of the matmul work).
``tiny``   minimal widths and depths for the tests (seconds on CPU).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Published configurations
# --------------------------------------------------------------------------------------------

#: SD3.5-Medium ``SD3Transformer2DModel``: 24 MMDiT-X blocks, 24 x 64 heads,
#: dual attention in blocks 0-12, RMS qk-norm; 2.24 B parameters.
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)

#: SD3 / SD3.5 16-channel VAE (``AutoencoderKL``), no quant convs.
SD35_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

#: The released DiNa-LRM config (``liuhuohuo/DiNa-LRM-SD35M-12layers``), model section + add_noise.
DINA_LRM_MODEL: dict[str, Any] = {
    "model_type": "thurstone",
    "num_transformer_layers": 12,
    "visual_head_idx": [4, 8, 12],
    "text_head_idx": [4, 8, 12],
    "use_lora": True,
    "freeze_backbone": False,
    "use_text_features": True,
    "lora_config": {"r": 64, "lora_alpha": 128, "init_lora_weights": "gaussian"},
    "use_logistic": False,
    "use_t_embed": True,
    "reward_head": {
        "use_proj_in": False,
        "width": -1,
        "out_dim": 1,
        "num_queries": 4,
        "num_attn_heads": 8,
        "dropout": 0.0,
    },
}

#: Policy LoRA of the paper's ReFL recipe: r 32, alpha 64, joint attention only.
POLICY_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)

#: CLIP ViT-H/14 (OpenCLIP laion2B; PickScore and HPSv2 are fine-tunes of it): 224 px, 986 M params.
CLIP_VIT_H_14: dict[str, Any] = dict(
    text_config=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act="gelu",
    ),
    vision_config=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    ),
    projection_dim=1024,
)

#: Qwen2-VL-7B (HPSv3's backbone): 28-layer 3584-wide GQA LLM + 32-layer 1280-wide ViT with
#: 14 px patches, 2x2 spatial merge and temporal patch 2; 8.29 B params.
QWEN2_VL_7B: dict[str, Any] = dict(
    text_config=dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32,
        embed_dim=1280,
        hidden_size=3584,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    ),
)

#: SD3 / SD3.5 frozen text encoders (``text_encoder``, ``text_encoder_2``, ``text_encoder_3`` of the
#: pipeline): CLIP ViT-L/14 text tower with projection (124 M), OpenCLIP ViT-bigG/14 text tower with
#: projection (695 M) and the T5 v1.1 XXL encoder (4.76 B). The policy needs their prompt embeddings.
SD3_CLIP_L_TEXT: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
)
SD3_CLIP_G_TEXT: dict[str, Any] = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
    max_position_embeddings=77, vocab_size=49408, hidden_act="gelu",
)
SD3_T5_XXL_ENCODER: dict[str, Any] = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
)

#: Text tokens of the VLM scorer besides the image tokens: chat template + instruction + prompt
#: (HPSv3-style; the prompt itself is ~20-60 tokens). The image tokens dominate at 512 and 1024.
VLM_TEXT_TOKENS = 96
#: Qwen2-VL image-size rounding: sides are rounded to multiples of patch * merge = 28 px.
QWEN_RESIZE_FACTOR = 28
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 12845056  # the processor's default (~12.8 M px): never binds at 512 or 1024

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass
class Preset:
    """One consistent set of architecture configs (see the module docstring)."""

    name: str
    transformer: dict[str, Any]
    rm_model: dict[str, Any]
    policy_lora_r: int
    vae: dict[str, Any]
    clip: dict[str, Any]
    vlm: dict[str, Any]
    vlm_text_tokens: int = VLM_TEXT_TOKENS
    #: One line saying how this preset relates to the published sizes.
    description: str = "published sizes"
    #: Latent pixels per image pixel side (the VAE's downsampling).
    vae_factor: int = 8

    def rm_config(self) -> dict[str, Any]:
        """Full config dict as ``LatentRewardModel.from_config`` takes it."""
        return {"model": copy.deepcopy(self.rm_model), "training": {"add_noise": True}}

    @property
    def inner_dim(self) -> int:
        return int(self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"])

    @property
    def clip_image_size(self) -> int:
        return int(self.clip["vision_config"]["image_size"])


def _scaled(d: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(d)
    out.update(changes)
    return out


def _full_preset() -> Preset:
    return Preset(
        name="full",
        transformer=dict(SD35_MEDIUM_TRANSFORMER),
        rm_model=copy.deepcopy(DINA_LRM_MODEL),
        policy_lora_r=32,
        vae=dict(SD35_VAE),
        clip=copy.deepcopy(CLIP_VIT_H_14),
        vlm=copy.deepcopy(QWEN2_VL_7B),
    )


def _small_preset() -> Preset:
    """Widths / 8, depths and token counts kept (CPU benchmark)."""
    full = _full_preset()
    transformer = _scaled(
        full.transformer,
        attention_head_dim=32,
        num_attention_heads=6,  # inner 192 = 1536 / 8
        joint_attention_dim=512,
        caption_projection_dim=192,
        pooled_projection_dim=256,
        pos_embed_max_size=96,
    )
    rm = copy.deepcopy(DINA_LRM_MODEL)
    rm["lora_config"] = {"r": 8, "lora_alpha": 16, "init_lora_weights": "gaussian"}
    vae = _scaled(full.vae, block_out_channels=(16, 32, 64, 64), norm_num_groups=8)
    clip = copy.deepcopy(CLIP_VIT_H_14)
    clip["text_config"].update(hidden_size=128, intermediate_size=512)
    clip["vision_config"].update(hidden_size=160, intermediate_size=640)
    clip["projection_dim"] = 128
    vlm = copy.deepcopy(QWEN2_VL_7B)
    vlm["text_config"].update(hidden_size=448, intermediate_size=2368, num_attention_heads=28, num_key_value_heads=4,
                              rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vlm["vision_config"].update(embed_dim=160, hidden_size=448)
    return Preset("small", transformer, rm, 4, vae, clip, vlm,
                  description="widths / 8 of SD3.5-M, its VAE and CLIP-H; depths and token counts kept")


def _tiny_preset() -> Preset:
    """Minimal sizes (tests). Same structure: RM = first 4 of 6 blocks, taps [2, 4]."""
    from dinalrm_align.tiny_pipelines import TINY_TRANSFORMER_KWARGS, tiny_reward_model_config

    transformer = dict(TINY_TRANSFORMER_KWARGS)
    rm = tiny_reward_model_config("sd3")["model"]
    vae = _scaled(SD35_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    clip = dict(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=512, hidden_act="gelu",
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, hidden_act="gelu"),
        projection_dim=32,
    )
    vlm = dict(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         bos_token_id=0, eos_token_id=1,
                         rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
    )
    return Preset("tiny", transformer, rm, 4, vae, clip, vlm, vlm_text_tokens=16,
                  description="minimal test sizes (RM = 4 of 6 blocks)")


def get_preset(name: str) -> Preset:
    """``full`` | ``small`` | ``tiny``."""
    builders = {"full": _full_preset, "small": _small_preset, "tiny": _tiny_preset}
    if name not in builders:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(builders)}")
    return builders[name]()
