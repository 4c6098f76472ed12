"""Lazy package exports (PEP 562), so importing a package does not import torch/diffusers."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` exporting ``{name: submodule}``.

    A submodule is relative to ``package`` (``"schedule"``) or absolute (``"dinalrm_align.x.y"``).
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            module = exports[name]
            module = module if module.startswith("dinalrm_align.") else f"{package}.{module}"
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__
