"""Backbone adapters: what differs between model families (SD3.5, FLUX.1, Z-Image), behind one interface.

``registry`` (leaf: name -> adapter), ``base`` (the :class:`BackboneAdapter` interface), ``conditioning``
(:class:`TextConditioning`), ``sd3`` / ``flux`` / ``zimage`` (one adapter per family), ``loading`` (load any
supported pipeline, tiny ids included). Adding a family is one adapter module plus a
:func:`~dinalrm_align.backbones.registry.register_backbone` call (docs/backbones.md).
"""

from __future__ import annotations

from typing import Any

from dinalrm_align._lazy import lazy_exports

_LAZY = {
    "BackboneAdapter": "base",
    "TextConditioning": "conditioning",
    "get_adapter": "registry",
    "adapter_for": "registry",
    "load_any_pipeline": "loading",
    "register_backbone": "registry",
}

__all__ = sorted([*_LAZY, "unpack_latents"])

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


def unpack_latents(pipe: Any, latents: Any, height: int, width: int) -> Any:
    """What ``pipe(..., output_type="latent")`` returns -> unpacked ``(B, 16, h, w)`` latents (FLUX packs
    2x2 patches into 64-channel tokens; SD3 / Z-Image latents are returned unchanged)."""
    from dinalrm_align.backbones.registry import adapter_for

    return adapter_for(pipe).unpack_pipeline_latents(pipe, latents, height, width)
