"""The colour world's ground truth: vocabulary, colour optics and the golden reward (never trained on).

The tiny random VAE decodes every latent to nearly the same pinkish grey: measured mean colours
vary by only ~0.01-0.05 between latents. The world therefore defines, once and deterministically:

- ``directions`` (3, 16): the three latent directions (spatially constant per-channel offsets) that
  change the decoded mean colour most, from the SVD of the decoder's colour Jacobian at generated
  latents (the first is ~3x and ~7x stronger than the others).
- a fixed colour calibration ``c -> clamp(0.5 + k (c - mean), 0, 1)``: one contrast gain ``k`` (no
  rotation, so "redder" stays red), chosen so that the decoder's weak colour range spans a visible
  part of the RGB cube.

Golden reward of a decoded image for the prompt "a <colour> <object>":
``1 - || calibrated mean colour - rgb(colour) ||_2 / sqrt(3)`` in [0, 1] (1 = exact colour).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

#: The colour words: the eight corners of the RGB cube.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}
OBJECTS: tuple[str, ...] = (
    "cube", "ball", "car", "house", "tree", "cat", "dog", "flower", "bird", "boat", "cup", "chair", "apple", "hat",
)
CALIBRATED_STD = 0.2


def make_prompts(colours: Sequence[str] = tuple(COLOURS), objects: Sequence[str] = OBJECTS) -> list[str]:
    """Every ``"a <colour> <object>"`` (colour-major order)."""
    unknown = [c for c in colours if c not in COLOURS]
    if unknown:
        raise ValueError(f"unknown colour word(s) {unknown}; known: {', '.join(COLOURS)}")
    return [f"a {c} {o}" for c in colours for o in objects]


def colour_word(prompt: str) -> str:
    """The colour word of ``"a <colour> <object>"`` (ValueError otherwise)."""
    words = prompt.split()
    if len(words) < 3 or words[1] not in COLOURS:
        raise ValueError(f"not a colour-world prompt (expected 'a <colour> <object>'): {prompt!r}")
    return words[1]


def target_colours(prompts: Sequence[str]) -> torch.Tensor:
    """RGB targets (B, 3) in [0, 1] of the prompts' colour words."""
    return torch.tensor([COLOURS[colour_word(p)] for p in prompts], dtype=torch.float32)


def measure_colour(images: torch.Tensor) -> torch.Tensor:
    """Mean colour (B, 3) of images (B, 3, H, W) in [0, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    return images.float().mean(dim=(2, 3))


def decode(pipe: Any, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], no grad, with the pipeline's
    backbone adapter (any supported family; as the trainer's evaluation decodes)."""
    from dinalrm_align.backbones.registry import adapter_for

    adapter = adapter_for(pipe)
    return torch.cat([adapter.decode(pipe, latents[i : i + batch_size]).cpu() for i in range(0, latents.shape[0], batch_size)])


@dataclass
class ColourOptics:
    """Tint directions in latent space and the fixed colour calibration of measured colours."""

    directions: list[list[float]]  # (3, C) latent offset per unit tint
    mean: list[float]  # (3,)
    whitening: list[list[float]]  # (3, 3)
    tint_scale: float
    singular_values: list[float]

    def tint(self, tints: torch.Tensor) -> torch.Tensor:
        """Tints (..., 3) -> spatially constant latent offsets (..., C, 1, 1)."""
        offsets = tints.float() @ torch.tensor(self.directions)
        return offsets[..., None, None]

    def distractors(
        self, n: int, shape: tuple[int, int, int], offset_scale: float, pattern_scale: float, generator: torch.Generator
    ) -> torch.Tensor:
        """Perturbations that leave the decoded colour (nearly) unchanged, (n, C, h, w): spatially
        constant offsets in the null space of the colour directions plus zero-mean 2x2-periodic patterns."""
        c, h, w = shape
        basis, _ = torch.linalg.qr(torch.tensor(self.directions).T, mode="complete")  # (C, C)
        null = basis[:, 3:]  # (C, C - 3)
        offsets = (torch.randn(n, c - 3, generator=generator) @ null.T) * offset_scale
        tile = torch.randn(n, c, 2, 2, generator=generator) * pattern_scale
        tile = tile - tile.mean(dim=(2, 3), keepdim=True)
        pattern = tile.repeat(1, 1, (h + 1) // 2, (w + 1) // 2)[:, :, :h, :w]
        return offsets[..., None, None] + pattern

    def calibrate(self, measured: torch.Tensor) -> torch.Tensor:
        """Measured mean colours (B, 3) -> calibrated colours (B, 3) in [0, 1]."""
        w = torch.tensor(self.whitening)
        return (0.5 + (measured.float() - torch.tensor(self.mean)) @ w.T).clamp(0.0, 1.0)

    def calibrate_images(self, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel calibration (display): images (B, 3, H, W) -> (B, 3, H, W) in [0, 1]."""
        w = torch.tensor(self.whitening)
        x = images.float().permute(0, 2, 3, 1) - torch.tensor(self.mean)
        return (0.5 + x @ w.T).clamp(0.0, 1.0).permute(0, 3, 1, 2)

    def golden(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Golden reward (B,) in [0, 1] of decoded images for their prompts."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"got {images.shape[0]} images for {len(prompts)} prompts")
        colour = self.calibrate(measure_colour(images))
        return 1.0 - (colour - target_colours(prompts)).norm(dim=1) / math.sqrt(3.0)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ColourOptics:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"colour optics file not found: {path}")
        return cls(**json.loads(path.read_text()))


def colour_jacobian(pipe: Any, latents: torch.Tensor, step: float = 0.5) -> torch.Tensor:
    """d(mean decoded colour) / d(per-channel constant offset), averaged over ``latents`` -> (3, C)."""
    c = latents.shape[1]
    base = measure_colour(decode(pipe, latents))
    cols = []
    for k in range(c):
        offset = torch.zeros(1, c, 1, 1)
        offset[0, k] = step
        cols.append((measure_colour(decode(pipe, latents + offset)) - base).mean(0) / step)
    return torch.stack(cols, dim=1)


def fit_optics(
    pipe: Any,
    latents: torch.Tensor,
    tint_size: float = 1.0,
    generator: torch.Generator | None = None,
    calibrated_std: float = CALIBRATED_STD,
) -> ColourOptics:
    """Fit the tint directions and the colour calibration on generated ``latents`` (N, C, h, w).

    Directions: the top three right-singular vectors of the colour Jacobian ``J = U S Vh``, times
    ``tint_size`` (latent offset norm per unit tint). Calibration: one isotropic contrast gain
    ``k`` (keeps the decoder's colour orientation) chosen so that the measured colours of the
    latents offset by ``t @ Vh`` with ``t ~ N(0, I)`` (latent offsets of norm ~1) spread with std
    ``calibrated_std`` along their main axis.
    """
    jac = colour_jacobian(pipe, latents[: min(8, latents.shape[0])])
    _, s, vh = torch.linalg.svd(jac, full_matrices=False)
    directions = tint_size * vh
    unit = torch.randn(latents.shape[0], 3, generator=generator) @ vh  # unit-size tints
    colours = measure_colour(decode(pipe, latents + unit[..., None, None])).double()
    mean = colours.mean(0)
    top = float(torch.linalg.eigvalsh(torch.cov((colours - mean).T))[-1].clamp_min(1e-12).sqrt())
    gain = calibrated_std / top
    return ColourOptics(
        directions=directions.tolist(),
        mean=mean.float().tolist(),
        whitening=(gain * torch.eye(3)).tolist(),
        tint_scale=float(tint_size),
        singular_values=s.tolist(),
    )


def golden_reward_factory(optics: str) -> Any:
    """Proxy-reward factory for the shared trainer's evaluation (``eval.proxy_rewards``):
    returns ``fn(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` golden rewards."""
    loaded = ColourOptics.load(optics)

    def golden(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return loaded.golden(images.detach().cpu(), prompts)

    return golden
