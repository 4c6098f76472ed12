"""Algorithm registry: name -> ``"module:Class"``, imported on demand.

Recipes select an algorithm with ``algorithm: {name: NAME}``; a name that is not registered but looks
like an import path (``my_pkg.algos:MyAlgo``) is imported directly, so users plug in their own
algorithms without touching the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dinalrm_align.backbones.registry import import_object

if TYPE_CHECKING:  # pragma: no cover
    from dinalrm_align.algorithms.base import Algorithm

__all__ = ["ALGORITHMS", "import_object", "register_algorithm", "resolve_algorithm"]

#: Built-in algorithms.
ALGORITHMS: dict[str, str] = {
    "refl": "dinalrm_align.algorithms.refl:ReFL",
    "grpo": "dinalrm_align.algorithms.grpo:GRPO",
    "reward_model": "dinalrm_align.rm_training.algorithm:RewardModelTraining",
}


def register_algorithm(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:Class"`` so recipes can say ``algorithm: {name: NAME}``."""
    if ":" not in target:
        raise ValueError(f"algorithm target {target!r} must look like 'package.module:Class'")
    ALGORITHMS[name] = target


def resolve_algorithm(name: str) -> type[Algorithm]:
    """Algorithm class for a registered name or an import path ``pkg.module:Class``."""
    from dinalrm_align.algorithms.base import Algorithm

    target = ALGORITHMS.get(name)
    if target is None and (":" in name or "." in name):
        target = name
    if target is None:
        raise ValueError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(ALGORITHMS)}")
    cls = import_object(target)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ValueError(f"{target!r} is not a subclass of dinalrm_align.algorithms.base.Algorithm")
    return cls
