"""The pixel-space reward scorers of the benchmarks, on images in [0, 1].

* :func:`clip_score` -- PickScore / HPSv2 style: CLIP image-text cosine x logit scale at the CLIP
  input size (224 px for ViT-H/14);
* :func:`vlm_score` -- HPSv3 style: Qwen2-VL over ``[template | image tokens | prompt]`` with a linear
  head on the last hidden state; the image is resized to multiples of 28 px as Qwen2-VL's processor does
  (:func:`qwen_grid`, :func:`vlm_image_tokens`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.configs import CLIP_MEAN, CLIP_STD, QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, QWEN_RESIZE_FACTOR


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
