"""Image grids with captions under each image (prompt, rewards): what people look at after a run."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np

__all__ = ["captioned_grid", "make_grid"]


def make_grid(images: Sequence[np.ndarray], columns: int) -> object:
    """uint8 HWC images -> one PIL grid image (row-major, no captions)."""
    from PIL import Image

    if not images:
        raise ValueError("no images for the grid")
    h, w = images[0].shape[:2]
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return Image.fromarray(grid)


def captioned_grid(
    images: Sequence[np.ndarray], captions: Sequence[Sequence[str]], columns: int, min_cell: int = 192
) -> object:
    """A grid whose cells are an image (upscaled to at least ``min_cell`` px, nearest neighbour, so tiny
    images stay visible) above its caption lines (the first line is wrapped, e.g. the prompt)."""
    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise ValueError("no images for the grid")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default()
    h, w = images[0].shape[:2]
    scale = max(1, math.ceil(min_cell / max(h, w)))
    cell_w, cell_h = w * scale, h * scale
    chars = max(8, cell_w // 6)
    wrapped = [textwrap.wrap(c[0], chars)[:3] + list(c[1:]) if c else [] for c in captions]
    text_h = 12 * max((len(lines) for lines in wrapped), default=0) + 6
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    pad = 4
    canvas = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        r, c = divmod(i, columns)
        x, y = pad + c * (cell_w + pad), pad + r * (cell_h + text_h + pad)
        canvas.paste(Image.fromarray(img).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x + 2, y + cell_h + 3 + 12 * k), line, fill=(0, 0, 0), font=font)
    return canvas
