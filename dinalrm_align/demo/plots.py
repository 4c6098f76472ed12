"""The colour-world figure: reward / golden-reward curves, RM accuracy per u, before/after image grid."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.demo.world import COLOURS, ColourOptics, colour_word


def display_images(images: torch.Tensor, optics: ColourOptics, block: int = 4) -> torch.Tensor:
    """Decoded images (B, 3, H, W) -> calibrated display images (B, 3, H, W): ``block`` x ``block``
    averages first (the calibration amplifies pixel noise), then the world's colour calibration."""
    pooled = torch.nn.functional.avg_pool2d(images.float(), block)
    return torch.nn.functional.interpolate(optics.calibrate_images(pooled), scale_factor=block, mode="nearest")


def write_figure(
    path: str | os.PathLike,
    train_curve: Sequence[tuple[float, float]],
    eval_curve: Sequence[tuple[float, float, float]],
    before_after: dict[str, Any],
    optics: ColourOptics,
    accuracy: dict[str, float],
    title: str = "Colour world",
    max_columns: int = 12,
) -> Path:
    """One PNG: curves on top, the before/after grid of held-out prompts below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = before_after["prompts"][:max_columns]
    n = len(prompts)
    fig = plt.figure(figsize=(max(11.0, 1.1 * n), 7.5), dpi=110)
    outer = fig.add_gridspec(2, 1, height_ratios=[1.6, 1.4], hspace=0.3)
    top = outer[0].subgridspec(1, 2, wspace=0.45)
    cells = outer[1].subgridspec(2, max(n, 1), hspace=0.45, wspace=0.12)
    ax = fig.add_subplot(top[0, 0])
    if train_curve:
        steps, values = zip(*train_curve)
        ax.plot(steps, values, color="C0", alpha=0.5, lw=1, label="learned reward (train batches)")
    if eval_curve:
        steps, learned, golden = zip(*eval_curve)
        ax.plot(steps, learned, "o-", color="C0", label="learned reward (held-out)")
        ax2 = ax.twinx()
        ax2.plot(steps, golden, "s-", color="C3", label="golden reward (held-out)")
        ax2.set_ylabel("golden reward", color="C3")
        ax2.legend(loc="lower right", fontsize=7)
    ax.set_xlabel("ReFL step")
    ax.set_ylabel("raw learned reward", color="C0")
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title("Alignment with the learned latent reward")
    ax.grid(alpha=0.3)
    axa = fig.add_subplot(top[0, 1])
    levels = [k for k in accuracy if k != "ensemble"]
    axa.plot([float(k) for k in levels], [100 * accuracy[k] for k in levels], "o-", color="C2", label="single u")
    if "ensemble" in accuracy:
        axa.axhline(100 * accuracy["ensemble"], color="C2", ls="--", label="ensemble {0.2, 0.5, 0.7}")
    axa.axhline(85, color="grey", ls=":", lw=1, label="target at u=0.4")
    axa.axhline(50, color="grey", lw=0.6)
    axa.set_xlabel("noise level u")
    axa.set_ylabel("held-out pairwise accuracy (%)")
    axa.set_title("Reward model accuracy")
    axa.legend(fontsize=7)
    axa.grid(alpha=0.3)
    for row, key in enumerate(("before", "after")):
        shown = display_images(before_after["images"][key][:n], optics)
        golden = before_after["golden"][key]
        for j, prompt in enumerate(prompts):
            cell = fig.add_subplot(cells[row, j])
            cell.imshow(shown[j].permute(1, 2, 0).numpy(), interpolation="nearest")
            colour = COLOURS[colour_word(prompt)]
            for side in cell.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(3)
            cell.set_xticks([])
            cell.set_yticks([])
            cell.set_title(f"{' '.join(prompt.split()[1:])}\n{float(golden[j]):.2f}", fontsize=7)
            if j == 0:
                cell.set_ylabel(key, fontsize=9)
    fig.suptitle(
        f"{title}: held-out golden reward {float(before_after['golden']['before'].mean()):.3f} -> "
        f"{float(before_after['golden']['after'].mean()):.3f} (frame = prompt colour; images shown calibrated)",
        fontsize=10,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
