"""Reading one preference image strictly: its header size, or its Lanczos-resized RGB pixels.

A bad image is an :class:`ImageFault` (reason + detail), never a stray exception type: Pillow
raises ``OSError`` for truncated data, ``SyntaxError`` for broken PNG chunks and
``DecompressionBombError`` (not an ``OSError``) for huge headers. :func:`strict_pil` makes the
reads strict whatever the process set before: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced off
(with it on, Pillow fills the missing rows of a truncated file with grey and returns a damaged
image without an error), and the pixel limit is ours (``max_pixels``, checked from the header
before any pixel is decoded). Only Pillow and numpy are imported, so the reader processes of
:mod:`.image_workers` start fast.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

#: Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``): 89,478,485 pixels.
DEFAULT_MAX_PIXELS = 89_478_485
#: Why an image is skipped.
FAULT_REASONS: tuple[str, ...] = (
    "missing_file",
    "unreadable",
    "truncated",
    "too_large",
    "timeout",
    "reader_crashed",
)


class ImageFault(Exception):
    """An image that cannot be used: ``reason`` (one of :data:`FAULT_REASONS`) and a ``detail`` text."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@contextmanager
def strict_pil() -> Iterator[None]:
    """Within the block: truncated images raise; Pillow's own pixel limit and its warning are off
    (callers check ``max_pixels`` themselves). Restores the previous settings afterwards."""
    from PIL import Image, ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def describe(ref: str | bytes) -> str:
    """A short name of an image reference for messages: the path, or the size of in-memory bytes."""
    return ref if isinstance(ref, str) else f"<{len(ref)} bytes>"


def _fault(exc: BaseException) -> ImageFault:
    text = f"{type(exc).__name__}: {exc}"
    if "DecompressionBomb" in type(exc).__name__:
        return ImageFault("too_large", text)
    if "truncated" in str(exc).lower():
        return ImageFault("truncated", text)
    return ImageFault("unreadable", text)


def _open(ref: str | bytes) -> Any:
    from PIL import Image

    if isinstance(ref, str) and (not os.path.exists(ref) or os.path.isdir(ref)):
        raise ImageFault("missing_file", f"no such file: {ref}")  # (a pipe or device is opened: it may block)
    return Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageFault(
            "too_large", f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} (max_pixels)"
        )


def read_size(ref: str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(height, width)`` from the header only; :class:`ImageFault` when missing, unreadable or too large."""
    try:
        with strict_pil(), _open(ref) as img:
            width, height = img.size
    except ImageFault:
        raise
    except Exception as exc:  # any decoder error is this image's fault, never the run's
        raise _fault(exc) from exc
    _check_pixels(width, height, max_pixels)
    return height, width


def decode_rgb(ref: str | bytes, bucket: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode the whole image, convert to RGB, Lanczos-resize to ``bucket`` (H, W) -> uint8 (H, W, 3).

    :class:`ImageFault` when the file is missing, truncated, unreadable or over ``max_pixels``.
    """
    from PIL import Image

    try:
        with strict_pil(), _open(ref) as img:
            _check_pixels(*img.size, max_pixels)
            img.load()
            rgb = img.convert("RGB").resize((bucket[1], bucket[0]), Image.Resampling.LANCZOS)
            array = np.asarray(rgb, dtype=np.uint8)
    except ImageFault:
        raise
    except Exception as exc:
        raise _fault(exc) from exc
    return np.ascontiguousarray(array)
