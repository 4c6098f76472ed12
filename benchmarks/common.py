"""Shared pieces of the benchmarks: published architecture configs, builders, scorers, FLOP counting.

Every model here is built from its published hyper-parameters (no hub access, no weights): the
SD3.5-Medium MMDiT-X transformer and its 16-channel VAE (diffusers), a CLIP ViT-H/14 image-text
model (PickScore / HPSv2 class) and a Qwen2-VL-7B vision-language model (HPSv3 class)
(transformers). Build them under ``device="meta"`` to count FLOPs at real scale without memory,
or on a real device (with random weights) to time them.

Three presets share one code path:

``full``   the published sizes (FLOPs on meta; the GPU benchmark).
``small``  every width divided by 8, every depth and token count kept ("matched reduced size"
           for the CPU benchmark: the same graph, ~1/64 of the matmul work).
``tiny``   minimal widths and depths for the tests (seconds on CPU).

Conventions (see docs/architecture.md): latents are SD3-normalised ``(z - shift) * scale``;
images leave the VAE in [-1, 1] and are mapped to [0, 1] before a scorer's own preprocessing.
FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add;
matmuls, convolutions and attention only -- elementwise ops, norms and resizes are not counted).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Published configurations
# --------------------------------------------------------------------------------------------

#: SD3.5-Medium ``SD3Transformer2DModel`` (spec dina_lrm.md 1.2): 24 MMDiT-X blocks, 24 x 64 heads,
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

#: Policy LoRA of the paper's ReFL recipe (spec 5.1): r 32, alpha 64, joint attention only.
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
    from dinalrm_align.testing import TINY_REWARD_MODEL_SECTION, TINY_TRANSFORMER_KWARGS

    transformer = dict(TINY_TRANSFORMER_KWARGS)
    rm = copy.deepcopy(TINY_REWARD_MODEL_SECTION)
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


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _creation(device: str | torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (no fp32 copy, no cast warnings)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def build_transformer(preset: Preset, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """SD3 ``SD3Transformer2DModel`` of the preset (random init on real devices), frozen, eval."""
    from diffusers import SD3Transformer2DModel

    with _creation(device, dtype):
        model = SD3Transformer2DModel(**preset.transformer)
    return _frozen(model)


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

    with _creation(device, dtype):
        vae = AutoencoderKL(**preset.vae)
    return _frozen(vae)


def build_clip(preset: Preset, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """CLIP image-text model of the preset (ViT-H/14 at full size), frozen, eval, SDPA attention."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**copy.deepcopy(preset.clip))
    config._attn_implementation = "sdpa"
    with _creation(device, dtype):
        model = CLIPModel(config)
    return _frozen(model)


def build_vlm(preset: Preset, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """Qwen2-VL model of the preset (7B at full size), frozen, eval, SDPA attention."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(**copy.deepcopy(preset.vlm))
    config._attn_implementation = "sdpa"
    with _creation(device, dtype):
        model = Qwen2VLForConditionalGeneration(config)
        # HPSv3-style reward head on the last hidden state (the vocabulary head is never used).
        model.reward_head = nn.Linear(config.text_config.hidden_size, 2)
    return _frozen(model)


def build_reward_model(
    preset: Preset,
    transformer: nn.Module,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    share_base_weights: bool = False,
):
    """The project's ``LatentRewardModel.from_config`` on ``transformer`` (frozen, eval).

    On the meta device the head/LoRA are created on the CPU by ``from_config`` and then moved.
    """
    from dinalrm_align.reward_model.model import LatentRewardModel

    rm = LatentRewardModel.from_config(
        preset.rm_config(), transformer=transformer, share_base_weights=share_base_weights,
        device=device, torch_dtype=dtype,
    )
    return _frozen(rm)


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


def _pooled(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def clip_score(clip: nn.Module, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """PickScore/HPSv2-style reward: cosine(image, text) x logit scale. ``images`` in [0, 1]."""
    size = clip.config.vision_config.image_size
    dtype = next(clip.parameters()).dtype
    # Resize in fp32 (bicubic kernels do not cover every low-precision dtype), then the model dtype.
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).to(dtype)
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    img = F.normalize(_pooled(clip.get_image_features(pixel_values=x)), dim=-1)
    txt = F.normalize(_pooled(clip.get_text_features(input_ids=input_ids)), dim=-1)
    return clip.logit_scale.exp() * (img * txt).sum(-1)


def qwen_grid(resolution: int) -> tuple[int, int]:
    """Qwen2-VL patch grid (h, w) for a square image: sides rounded to multiples of 28 px."""
    side = max(QWEN_RESIZE_FACTOR, round(resolution / QWEN_RESIZE_FACTOR) * QWEN_RESIZE_FACTOR)
    if side * side < QWEN_MIN_PIXELS:
        side = math.ceil(math.sqrt(QWEN_MIN_PIXELS) / QWEN_RESIZE_FACTOR) * QWEN_RESIZE_FACTOR
    if side * side > QWEN_MAX_PIXELS:
        side = math.floor(math.sqrt(QWEN_MAX_PIXELS) / QWEN_RESIZE_FACTOR) * QWEN_RESIZE_FACTOR
    grid = side // 14
    return grid, grid


def vlm_image_tokens(resolution: int, merge: int = 2) -> int:
    """LLM tokens one image costs in Qwen2-VL at ``resolution`` (after the 2x2 merge)."""
    gh, gw = qwen_grid(resolution)
    return (gh // merge) * (gw // merge)


def _qwen_patches(images: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[0,1] images (1, 3, H, W) -> Qwen2-VL flattened patches (N, 3*T*p*p) and grid_thw (1, 3).

    Patches are listed merge-window by merge-window (the order the 2x2 merger expects); the
    single frame is repeated ``temporal`` times, as the processor does for still images.
    """
    if images.shape[0] != 1:
        raise ValueError("the VLM scorer handles one image per call")
    gh, gw = images.shape[-2] // patch, images.shape[-1] // patch
    x = images[0].unsqueeze(0).expand(temporal, -1, -1, -1)  # (T, C, H, W)
    x = x.reshape(temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (gh/m, gw/m, m, m, C, T, p, p)
    patches = x.reshape(gh * gw, 3 * temporal * patch * patch)
    return patches, torch.tensor([[1, gh, gw]])


def vlm_score(vlm: nn.Module, images: torch.Tensor, n_text_tokens: int) -> torch.Tensor:
    """HPSv3-style reward: Qwen2-VL on [template | image tokens | prompt], linear head on the last token.

    ``images`` in [0, 1], (1, 3, H, W); resized to the Qwen2-VL grid (multiples of 28 px).
    """
    from transformers.vision_utils import get_vision_position_ids

    vc = vlm.config.vision_config
    gh, gw = qwen_grid(images.shape[-1])
    dtype = next(vlm.parameters()).dtype
    x = F.interpolate(images.float(), size=(gh * vc.patch_size, gw * vc.patch_size), mode="bicubic",
                      align_corners=False).to(dtype)
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    patches, grid = _qwen_patches((x - mean) / std, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
    position_ids = get_vision_position_ids(grid, vc.spatial_merge_size).to(x.device)
    model = vlm.model
    image_embeds = _pooled(model.visual(patches, grid_thw=grid, position_ids=position_ids))
    ids = torch.zeros(1, n_text_tokens, dtype=torch.long, device=x.device)
    text_embeds = model.language_model.embed_tokens(ids)
    split = min(n_text_tokens, 16)  # system/template tokens before the image, the prompt after it
    embeds = torch.cat([text_embeds[:, :split], image_embeds.unsqueeze(0).to(text_embeds.dtype), text_embeds[:, split:]], 1)
    positions = torch.zeros(3, 1, embeds.shape[1], dtype=torch.long, device=x.device)
    hidden = model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
    return vlm.reward_head(hidden[:, -1])[:, 0]


# --------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------


@dataclass
class FlopCount:
    """FLOPs of one measured call (2 per multiply-add), split into forward and backward."""

    forward: int
    backward: int = 0
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def to_dict(self) -> dict[str, Any]:
        return {"forward": self.forward, "backward": self.backward, "total": self.total, "by_op": self.by_op}


def count_flops(
    forward: Callable[[], torch.Tensor], backward: bool = False, grad_enabled: bool | None = None
) -> FlopCount:
    """FLOPs of ``forward()`` (and of ``forward().float().sum().backward()`` when ``backward``).

    ``grad_enabled`` defaults to ``backward`` (a forward-only count runs under ``no_grad``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    grad = backward if grad_enabled is None else grad_enabled
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(grad):
        out = forward()
        fwd = counter.get_total_flops()
        if backward:
            out.float().sum().backward()
    counts = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    total = counter.get_total_flops()
    return FlopCount(forward=int(fwd), backward=int(total - fwd), by_op=counts)


def module_forward_flops(forward: Callable[[], Any], prefixes: Sequence[str]) -> dict[str, int]:
    """Forward FLOPs attributed to modules whose qualified name matches one of ``prefixes``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward()
    out: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        for prefix in prefixes:
            if name == prefix:
                out[prefix] = int(sum(ops.values()))
    return out


def param_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied tensors counted once)."""
    seen: set[int] = set()
    n = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def unique_param_bytes(*modules: nn.Module, bytes_per_param: int | None = None) -> int:
    """Bytes of the distinct parameter tensors of ``modules`` together (shared tensors once).

    Identity is the Python object (meta tensors have no storage); on real devices tensors that
    share a storage are also counted once.
    """
    seen_ids: set[int] = set()
    seen_ptrs: set[tuple[str, int]] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) in seen_ids:
                continue
            seen_ids.add(id(p))
            if p.device.type != "meta":
                key = (str(p.device), p.untyped_storage().data_ptr())
                if key in seen_ptrs:
                    continue
                seen_ptrs.add(key)
            total += p.numel() * (bytes_per_param if bytes_per_param is not None else p.element_size())
    return total


# --------------------------------------------------------------------------------------------
# Meta-device workaround for the project's input validation
# --------------------------------------------------------------------------------------------


class skip_finite_checks_on_meta:
    """Context manager: let ``validation.check_finite`` pass meta tensors (it calls ``.item()``).

    A meta tensor has no values, so "contains NaN/Inf" has no answer; the project's check raises
    ``Tensor.item() cannot be called on meta tensors``. Only used when the unpatched call fails.
    """

    def __enter__(self) -> skip_finite_checks_on_meta:
        from dinalrm_align.reward_model import validation

        self._module = validation
        self._original = validation.check_finite

        def check_finite(x: torch.Tensor, name: str) -> None:
            if isinstance(x, torch.Tensor) and x.device.type == "meta":
                return None
            return self._original(x, name)

        validation.check_finite = check_finite
        return self

    def __exit__(self, *exc: object) -> None:
        self._module.check_finite = self._original


# --------------------------------------------------------------------------------------------
# ReFL arithmetic
# --------------------------------------------------------------------------------------------


def expected_rollout_steps(k_low: int, k_high: int, graded_per_rollout: int = 1) -> float:
    """Expected no-grad sampler steps of one rollout when ``g`` graded steps branch from it.

    The rollout runs steps ``0..k_max-1`` where ``k_max`` is the largest of the ``g`` graded
    steps, drawn without replacement, uniformly from ``[k_low, k_high]`` (g = 1: the mean k).
    """
    values = list(range(k_low, k_high + 1))
    g = graded_per_rollout
    if not 1 <= g <= len(values):
        raise ValueError(f"graded_per_rollout must be in [1, {len(values)}], got {g}")
    n = len(values)
    total = math.comb(n, g)
    # P(max == values[i]) = C(i, g-1) / C(n, g)
    return sum(v * math.comb(i, g - 1) for i, v in enumerate(values)) / total


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------


def tflops(x: float) -> str:
    """FLOPs -> 'T' string with 3 significant decimals."""
    return f"{x / 1e12:.3f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def replace_doc_section(path: str | Path, name: str, text: str) -> Path:
    """Replace the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``path``.

    The markers are appended at the end of the file when absent.
    """
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    doc = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(doc):
        doc = pattern.sub(lambda _m: block, doc)
    else:
        doc = doc.rstrip() + ("\n\n" if doc else "") + block + "\n"
    path.write_text(doc)
    return path
