"""The colour world's pictures: reward curves over ReFL training and a captioned before/after grid (PNG)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinalrm_align.demo.world import ColourOptics

__all__ = ["display_images", "to_uint8", "write_before_after_grid", "write_curves"]


def display_images(images: torch.Tensor, optics: ColourOptics, block: int = 8) -> torch.Tensor:
    """Decoded images (B, 3, H, W) -> calibrated display images (B, 3, H, W) in [0, 1]: ``block`` x ``block``
    averages first (the calibration amplifies pixel noise), then the world's colour calibration."""
    block = max(1, min(block, images.shape[-1], images.shape[-2]))
    pooled = torch.nn.functional.avg_pool2d(images.float(), block)
    shown = optics.calibrate_images(pooled)
    return torch.nn.functional.interpolate(shown, size=tuple(images.shape[-2:]), mode="nearest")


def swatch_cells(images: torch.Tensor, prompts: Sequence[str], optics: ColourOptics) -> torch.Tensor:
    """Display cells (B, 3, H, W): the calibrated image on top; a bottom strip with the calibrated mean colour
    (what the golden reward measures) on the left two thirds and the prompt's target colour on the right."""
    from dinalrm_align.demo.world import measure_colour, target_colours

    cells = display_images(images, optics).clone()
    h, w = cells.shape[-2:]
    strip = max(2, h // 4)
    mean = optics.calibrate(measure_colour(images))
    target = target_colours(prompts)
    split = (2 * w) // 3
    cells[:, :, h - strip - 1, :] = 1.0  # a white line between image and strip
    cells[:, :, h - strip :, :split] = mean[:, :, None, None]
    cells[:, :, h - strip :, split:] = target[:, :, None, None]
    return cells


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] -> B uint8 HWC arrays."""
    return list((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def save_figure(fig: Any, path: str | os.PathLike, title: str) -> Path:
    """Give ``fig`` the title ``title``, write it to ``path`` (parents created) and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def write_curves(
    path: str | os.PathLike,
    eval_curve: Sequence[tuple[float, float, float]],
    accuracy: dict[str, float],
    train_curve: Sequence[tuple[float, float]] = (),
    title: str = "Colour world",
) -> Path:
    """Left: learned and golden reward of the held-out prompts at every ReFL evaluation (two labelled y axes).
    Right: the reward model's held-out pairwise accuracy per noise level u (and the ensemble)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axa) = plt.subplots(1, 2, figsize=(12.0, 4.6), dpi=110, gridspec_kw={"wspace": 0.45})
    lines = []
    if train_curve:
        steps, values = zip(*train_curve)
        lines += ax.plot(steps, values, color="C0", alpha=0.35, lw=1, label="learned reward (training batches)")
    if eval_curve:
        steps, learned, golden = zip(*eval_curve)
        lines += ax.plot(steps, learned, "o-", color="C0", label="learned reward (held-out prompts)")
        ax2 = ax.twinx()
        lines += ax2.plot(steps, golden, "s-", color="C3", label="golden reward (held-out prompts)")
        ax2.set_ylabel("golden reward (mean over held-out prompts, 0..1)", color="C3")
        ax2.tick_params(axis="y", colors="C3")
    ax.set_xlabel("ReFL step (optimizer updates)")
    ax.set_ylabel("learned reward (raw, mean over held-out prompts)", color="C0")
    ax.tick_params(axis="y", colors="C0")
    if lines:
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=7)
    ax.set_title("ReFL with the learned latent reward")
    ax.grid(alpha=0.3)
    levels = [k for k in accuracy if k != "ensemble"]
    axa.plot([float(k) for k in levels], [100 * accuracy[k] for k in levels], "o-", color="C2", label="single u")
    if "ensemble" in accuracy:
        axa.axhline(100 * accuracy["ensemble"], color="C2", ls="--", label="ensemble u in {0.2, 0.5, 0.7}")
    axa.axhline(85, color="grey", ls=":", lw=1, label="target at u = 0.4 (85 %)")
    axa.axhline(50, color="grey", lw=0.6)
    axa.set_xlabel("noise level u of the reward model")
    axa.set_ylabel("held-out pairwise accuracy (%)")
    axa.set_title("Reward model on held-out pairs")
    axa.legend(fontsize=7)
    axa.grid(alpha=0.3)
    return save_figure(fig, path, title)


def write_before_after_grid(
    path: str | os.PathLike, before_after: dict[str, Any], optics: ColourOptics, prompts_per_row: int = 4,
    title: str = "Colour world: held-out prompts",
) -> Path:
    """Captioned grid: for every held-out prompt its image before and after alignment side by side (same
    seed; shown through the world's colour calibration, bottom strip: mean colour | target colour, see
    :func:`swatch_cells`), each captioned with the prompt, the learned reward (raw) and the golden reward."""
    from dinalrm_align.trainer.grid import captioned_grid

    prompts = before_after["prompts"]
    shown = {k: to_uint8(swatch_cells(v, prompts, optics)) for k, v in before_after["images"].items()}
    images, captions = [], []
    for i, prompt in enumerate(prompts):
        for key in ("before", "after"):
            images.append(shown[key][i])
            captions.append([
                prompt, key, f"learned {float(before_after['learned'][key][i]):.2f}",
                f"golden {float(before_after['golden'][key][i]):.3f}",
            ])
    grid = captioned_grid(images, captions, columns=2 * prompts_per_row, min_cell=128)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _with_header(grid, [title, "each pair: before | after alignment (same seed); images shown through the world's colour "
                        "calibration; bottom strip: mean colour (scored by the golden reward) | target colour"]).save(path)
    return path


def _with_header(grid: Any, lines: Sequence[str]) -> Any:
    """``grid`` (PIL) with ``lines`` of text above it."""
    from PIL import Image, ImageDraw, ImageFont

    height = 14 * len(lines) + 8
    canvas = Image.new("RGB", (grid.width, grid.height + height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, 4 + 14 * i), line, fill=(0, 0, 0), font=ImageFont.load_default())
    canvas.paste(grid, (0, height))
    return canvas
