"""Explicit, configurable mapping from the raw DiNa-LRM reward to the scale a trainer sees.

``normalized = (raw + offset) / scale``. Presets (all positive affine maps):

========== ================ ====================================================================
name       formula          where it comes from
========== ================ ====================================================================
``raw``    raw              the head output, uncalibrated
``display`` (raw + 10) / 10 README / model default; "typically in [0, 2], centred near 1"
``fork``   (raw + 12) / 10  upstream Flow-GRPO alignment fork (``diffusion_rm_0.4``)
``model``  from checkpoint  ``rm.config.normalization`` (offset/scale saved with the model)
========== ================ ====================================================================

GRPO-style group-normalised advantages are invariant to any of these; for ReFL the ``1/scale``
factor acts as a learning-rate multiplier and the offset does nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

PRESETS: dict[str, tuple[float, float]] = {"raw": (0.0, 1.0), "display": (10.0, 10.0), "fork": (12.0, 10.0)}


@dataclass(frozen=True)
class ScoreNormalization:
    """``(raw + offset) / scale`` with ``scale > 0``; ``name`` is for logs and ``/info``."""

    offset: float = 10.0
    scale: float = 10.0
    name: str = "display"

    def __post_init__(self) -> None:
        for field, value in (("offset", self.offset), ("scale", self.scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"normalization {field} must be a finite number, got {value!r}")
        if self.scale <= 0:
            raise ValueError(f"normalization scale must be > 0 (keeps the reward order), got {self.scale}")

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw + self.offset) / self.scale

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "offset": float(self.offset), "scale": float(self.scale)}


def resolve_normalization(spec: Any, model: Any | None = None) -> ScoreNormalization:
    """Build a :class:`ScoreNormalization` from a preset name, ``(offset, scale)``, a mapping or itself.

    ``"model"`` reads ``model.config.normalization`` (a reward model is then required).
    """
    if isinstance(spec, ScoreNormalization):
        return spec
    if isinstance(spec, str):
        if spec == "model":
            if model is None:
                raise ValueError("normalization='model' needs a reward model to read offset/scale from")
            norm = model.config.normalization
            return ScoreNormalization(float(norm.offset), float(norm.scale), "model")
        if spec not in PRESETS:
            raise ValueError(
                f"unknown normalization {spec!r}; use one of {[*PRESETS, 'model']}, (offset, scale) or a mapping"
            )
        offset, scale = PRESETS[spec]
        return ScoreNormalization(offset, scale, spec)
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"offset", "scale", "name"}
        if unknown or not {"offset", "scale"} <= set(spec):
            raise ValueError(
                f"a normalization mapping needs exactly 'offset' and 'scale' (and 'name'), got {dict(spec)}"
            )
        return ScoreNormalization(spec["offset"], spec["scale"], str(spec.get("name", "custom")))
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return ScoreNormalization(spec[0], spec[1], "custom")
    raise ValueError(f"normalization must be a preset name, (offset, scale) or a mapping, got {spec!r}")
