"""Backbone registry (a leaf module: imports nothing from the package at import time).

Maps a backbone name to its adapter class by import path, so adapters load lazily and users can plug
in their own (``backbone: my_pkg.adapters:MyAdapter`` in a recipe or a reward-model config).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

__all__ = [
    "BACKBONES", "adapter_for", "backbone_names", "dtype_kwargs", "get_adapter", "import_object", "register_backbone",
]

#: Backbones: name -> "module:Class" (built-ins, imported lazily) or an adapter class (:func:`register_backbone`).
BACKBONES: dict[str, str | type] = {
    "sd3": "dinalrm_align.backbones.sd3:SD3Adapter",
    "flux": "dinalrm_align.backbones.flux:FluxAdapter",
    "zimage": "dinalrm_align.backbones.zimage:ZImageAdapter",
}

#: Accepted spellings of the built-in names.
ALIASES: dict[str, str] = {
    "sd35": "sd3", "sd3.5": "sd3", "sd3-5": "sd3", "flux1": "flux", "flux.1": "flux",
    "z-image": "zimage", "z_image": "zimage",
}

_CACHE: dict[str, Any] = {}


def import_object(target: str) -> Any:
    """Import ``"pkg.module:attr"`` or ``"pkg.module.attr"``; ValueError naming the target if it fails."""
    if ":" in target:
        module_name, attr = target.split(":", 1)
    elif "." in target:
        module_name, attr = target.rsplit(".", 1)
    else:
        raise ValueError(f"{target!r} is not an import path (expected 'package.module:name')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for {target!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (from {target!r})")
        obj = getattr(obj, part)
    return obj


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` dtype keyword for the installed diffusers (``dtype`` since 0.42, else ``torch_dtype``)."""
    if dtype is None:
        return {}
    import diffusers
    from packaging.version import Version

    return {"dtype": dtype} if Version(diffusers.__version__) >= Version("0.42") else {"torch_dtype": dtype}


def backbone_names() -> list[str]:
    return list(BACKBONES)


def register_backbone(name: str, target: str | type, *, replace: bool = False) -> None:
    """Make a user adapter available by name everywhere (recipes, ``adapter_for``, reward-model configs).

    ``target``: the adapter class or its import path ``"pkg.module:Class"`` (imported lazily). ValueError
    if the name is taken (``replace=True`` overrides) or the class is not a ``BackboneAdapter``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"backbone name must be an identifier, got {name!r}")
    key = name.lower()
    if (key in BACKBONES or key in ALIASES) and not replace:
        raise ValueError(f"backbone {name!r} is already registered (pass replace=True to override it)")
    if isinstance(target, type) and not any(c.__name__ == "BackboneAdapter" for c in target.__mro__):
        raise ValueError(f"{target.__name__} is not a BackboneAdapter subclass")  # (by name: this module is a leaf)
    BACKBONES[key] = target
    _CACHE.pop(key, None)


def get_adapter(name: str) -> Any:
    """The adapter (a shared instance) for a backbone name or an import path ``pkg.module:Class``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a non-empty string, got {name!r}")
    key = ALIASES.get(name.lower(), name.lower()) if ":" not in name else name
    if key in _CACHE:
        return _CACHE[key]
    target = BACKBONES.get(key)
    if target is None:
        if ":" not in name:
            raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
        target = name
    cls = target if isinstance(target, type) else import_object(target)
    adapter = cls()
    _CACHE[key] = adapter
    return adapter


def adapter_for(obj: Any) -> Any:
    """The adapter of a diffusers pipeline or transformer, chosen by its class (ValueError if none fits)."""
    for name in BACKBONES:
        adapter = get_adapter(name)
        if adapter.matches(obj):
            return adapter
    kind = type(obj).__name__
    raise ValueError(
        f"no backbone adapter for {kind}; supported pipelines/transformers: "
        + ", ".join(f"{get_adapter(n).pipeline_class_name}/{get_adapter(n).transformer_class_name}" for n in BACKBONES)
    )
