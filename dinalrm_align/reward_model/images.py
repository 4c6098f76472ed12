"""Scoring decoded images: images -> SD3 VAE latents -> latent reward.

This is the slower path (one VAE encode per image) for images on disk or trainers that only
hand over pixels. Accepted inputs: file paths, PIL images, a float tensor (B, 3, H, W) or
(3, H, W) in [0, 1], uint8 arrays/tensors (H, W, 3) or (B, H, W, 3). Images whose sides are not
multiples of the latent grid are centre-cropped to the nearest smaller multiple.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _pil_to_tensor(image: Any) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def to_pixel_tensors(images: Any) -> list[torch.Tensor]:
    """Normalise any accepted image input to a list of float (3, H, W) tensors in [0, 1]."""
    from PIL import Image

    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(
                f"image tensors must be (B, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            if images.shape[-1] == 3:  # NHWC uint8
                images = images.permute(0, 3, 1, 2)
            images = images.float() / 255.0
        elif not torch.is_floating_point(images):
            raise ValueError(f"image tensors must be float in [0, 1] or uint8, got {images.dtype}")
        images = list(images)
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError("images must be a non-empty list of paths, PIL images or tensors")
    out: list[torch.Tensor] = []
    for item in images:
        if isinstance(item, (str, Path)):
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"image file not found: {path}")
            with Image.open(path) as img:
                out.append(_pil_to_tensor(img))
        elif isinstance(item, Image.Image):
            out.append(_pil_to_tensor(item))
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            t = torch.as_tensor(item)
            if t.dtype == torch.uint8:
                t = (t.permute(2, 0, 1) if t.shape[-1] == 3 else t).float() / 255.0
            out.append(t.float())
        else:
            raise ValueError(f"unsupported image type {type(item).__name__}")
    for i, t in enumerate(out):
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"image {i} must have 3 channels (3, H, W), got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"image {i} contains NaN or Inf values")
        lo, hi = float(t.detach().min()), float(t.detach().max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"image {i} values must lie in [0, 1] (float) or be uint8, got range [{lo:.3f}, {hi:.3f}]"
            )
    return out


def _center_crop(x: torch.Tensor, multiple: int) -> torch.Tensor:
    _, h, w = x.shape
    nh, nw = (h // multiple) * multiple, (w // multiple) * multiple
    if nh == 0 or nw == 0:
        raise ValueError(f"image of {h}x{w} is smaller than the minimum size {multiple}x{multiple}")
    top, left = (h - nh) // 2, (w - nw) // 2
    return x[:, top : top + nh, left : left + nw]


def encode_images(
    pipe: Any,
    images: Any,
    *,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
    differentiable: bool = False,
) -> list[torch.Tensor]:
    """VAE-encode images into SD3-normalised latents, one (16, h, w) tensor per image.

    ``(posterior_sample_or_mean - shift) * scale`` with the pipeline family's constants; a posterior
    *sample* by default (how the reward models were trained; seed it with ``generator``), the mean with
    ``sample_posterior=False``.
    With ``differentiable=True`` the graph is kept, so gradients flow back to float image tensors
    (AlignProp-style reward back-propagation through pixels); otherwise no graph is built.
    """
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        return _encode_images(pipe, images, sample_posterior, generator)


def _encode_images(
    pipe: Any, images: Any, sample_posterior: bool, generator: torch.Generator | None
) -> list[torch.Tensor]:
    from dinalrm_align.backbones.registry import adapter_for

    adapter = adapter_for(pipe)
    vae = pipe.vae
    pixels = to_pixel_tensors(images)
    factor = adapter.vae_scale_factor(pipe)
    multiple = factor * adapter.latent_multiple(pipe.transformer)
    param = next(vae.parameters())
    latents = []
    for x in pixels:
        x = _center_crop(x, multiple).unsqueeze(0).to(param.device, param.dtype) * 2.0 - 1.0
        latents.append(adapter.encode_pixels(vae, x, sample=sample_posterior, generator=generator)[0])
    return latents


def score_images(
    rm: Any,
    images: Any,
    prompts: Sequence[str] | str,
    pipe: Any,
    u: float = 0.1,
    *,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
    max_sequence_length: int = 128,
    n_noise: int = 1,
) -> torch.Tensor:
    """Raw rewards (B,) of decoded images for their prompts.

    ``u=0.1`` is the recommended noise level for real (clean) images. ``prompts`` is one prompt
    for all images or one per image. Images of different sizes are scored in separate batches.
    ``generator`` seeds both the posterior sample (if any) and the reward's re-noising.
    """
    from dinalrm_align.reward_model.text import encode_conditioning

    latents = encode_images(pipe, images, sample_posterior=sample_posterior, generator=generator)
    if isinstance(prompts, str):
        prompts = [prompts] * len(latents)
    prompts = list(prompts)
    if len(prompts) != len(latents):
        raise ValueError(f"got {len(latents)} images but {len(prompts)} prompts")
    cond = encode_conditioning(pipe, prompts, max_sequence_length)
    scores = torch.empty(len(latents))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, z in enumerate(latents):
        groups.setdefault(tuple(z.shape), []).append(i)
    device = rm.device
    for idx in groups.values():
        batch = torch.stack([latents[i] for i in idx]).to(device)
        with torch.no_grad():
            raw = rm.score_conditioning(batch, cond[idx].to(device), u=u, generator=generator, n_noise=n_noise)
        scores[idx] = raw.float().cpu()
    return scores
