"""Aspect-ratio buckets of preference images (pure functions).

An image goes to the bucket whose aspect ratio is within ``AR_TOLERANCE`` in log space, then the
closest log-area. A pair split over two buckets shares one when the aspect ratios differ by less
than ``PAIR_AR_TOLERANCE`` (the smaller image is upscaled to the larger's long edge and the
element-wise minimum of the two sizes is re-bucketed); otherwise it is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Aspect-ratio buckets of DiNa-LRM's training data as (height, width) in pixels (all divisible by 32).
SD3_BUCKETS: tuple[tuple[int, int], ...] = (
    (256, 256),
    (512, 512),
    (1024, 1024),
    (1248, 832),
    (1344, 896),
    (832, 1248),
    (896, 1344),
    (1024, 768),
    (768, 1024),
    (1472, 832),
    (832, 1472),
    (1152, 832),
    (832, 1152),
)
AR_TOLERANCE = 0.03
PAIR_AR_TOLERANCE = 0.05


def parse_buckets(spec: str) -> list[tuple[int, int]]:
    """``"256x256,1248x832"`` (HxW) -> ``[(256, 256), (1248, 832)]``."""
    out = []
    for item in spec.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            h, w = (int(v) for v in item.split("x"))
        except ValueError as exc:
            raise ValueError(f"bucket {item!r} must look like HEIGHTxWIDTH, e.g. 1248x832") from exc
        if h <= 0 or w <= 0:
            raise ValueError(f"bucket {item!r} must have positive sides")
        out.append((h, w))
    if not out:
        raise ValueError(f"no buckets in {spec!r}")
    return out


def scale_buckets(buckets: Sequence[tuple[int, int]], scale: float, multiple: int = 1) -> list[tuple[int, int]]:
    """Scale every bucket by ``scale`` and round to a multiple of ``multiple`` (e.g. for tiny VAEs)."""
    out = []
    for h, w in buckets:
        sh = max(multiple, int(round(h * scale / multiple)) * multiple)
        sw = max(multiple, int(round(w * scale / multiple)) * multiple)
        if (sh, sw) not in out:
            out.append((sh, sw))
    return out


def assign_bucket(
    height: int, width: int, buckets: Sequence[tuple[int, int]], tolerance: float = AR_TOLERANCE
) -> tuple[int, int] | None:
    """Bucket of an image: aspect ratio within ``tolerance`` (log space), then the closest log-area."""
    if height <= 0 or width <= 0:
        return None
    log_ar = math.log(width / height)
    log_area = math.log(width * height)
    candidates = [b for b in buckets if abs(math.log(b[1] / b[0]) - log_ar) <= tolerance]
    if not candidates:
        return None
    return min(candidates, key=lambda b: abs(math.log(b[0] * b[1]) - log_area))


def pair_bucket(
    size_a: tuple[int, int],
    size_b: tuple[int, int],
    buckets: Sequence[tuple[int, int]],
    tolerance: float = AR_TOLERANCE,
    pair_tolerance: float = PAIR_AR_TOLERANCE,
) -> tuple[tuple[int, int] | None, str]:
    """Shared bucket of a pair of image sizes ``(height, width)`` -> ``(bucket, "")`` or ``(None, reason)``.

    Reasons: ``no_bucket`` (an image fits no bucket), ``bucket_mismatch`` (different buckets and no
    shared one).
    """
    ba = assign_bucket(*size_a, buckets, tolerance)
    bb = assign_bucket(*size_b, buckets, tolerance)
    if ba is None or bb is None:
        return None, "no_bucket"
    if ba == bb:
        return ba, ""
    ar_a, ar_b = size_a[1] / size_a[0], size_b[1] / size_b[0]
    if abs(ar_a / ar_b - 1.0) >= pair_tolerance:
        return None, "bucket_mismatch"
    large, small = (size_a, size_b) if size_a[0] * size_a[1] >= size_b[0] * size_b[1] else (size_b, size_a)
    factor = max(large) / max(small)
    scaled = (small[0] * factor, small[1] * factor)
    shared = (int(round(min(large[0], scaled[0]))), int(round(min(large[1], scaled[1]))))
    bucket = assign_bucket(*shared, buckets, tolerance)
    return (bucket, "") if bucket is not None else (None, "bucket_mismatch")
