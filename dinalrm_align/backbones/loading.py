"""Load any supported pipeline (tiny id, local folder or hub id) together with its backbone adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.backbones.registry import adapter_for, dtype_kwargs, get_adapter

__all__ = ["family_hint", "load_any_pipeline", "looks_local"]


def looks_local(spec: str) -> bool:
    """True for paths that cannot be hub ids (``./x``, ``/x``, ``~/x``, ``a/b/c``)."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def _class_name_of_folder(folder: Path) -> str | None:
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    try:
        return str(json.loads(index.read_text()).get("_class_name"))
    except (OSError, ValueError):
        return None


def _adapter_by_pipeline_name(name: str, what: str, spec: str) -> Any:
    from dinalrm_align.backbones.registry import BACKBONES

    for backbone in BACKBONES:
        adapter = get_adapter(backbone)
        if adapter.pipeline_class_name == name:
            return adapter
    supported = ", ".join(get_adapter(n).pipeline_class_name for n in BACKBONES)
    raise ValueError(f"{what} {spec} is a {name}; supported pipelines: {supported}")


def family_hint(spec: str, backbone: str = "auto") -> str | None:
    """The backbone family of a pipeline spec, when known without loading it (None: unknown).

    From, in order: an explicit ``backbone``, a tiny id, a local folder's ``model_index.json``, a hub id
    of a known family (``black-forest-labs/FLUX.1-*`` ...). Never downloads anything.
    """
    from dinalrm_align.backbones.registry import BACKBONES
    from dinalrm_align.tiny_pipelines import parse_tiny_id

    if backbone != "auto":
        return get_adapter(backbone).name
    tiny = parse_tiny_id(spec)
    if tiny is not None:
        return tiny[0]
    path = Path(spec).expanduser()
    if path.is_dir():
        name = _class_name_of_folder(path)
        return next((n for n in BACKBONES if name and get_adapter(n).pipeline_class_name == name), None)
    lowered = spec.lower()
    return next((n for n in BACKBONES if any(lowered.startswith(p) for p in get_adapter(n).hub_id_prefixes)), None)


def load_any_pipeline(
    spec: str,
    *,
    backbone: str = "auto",
    torch_dtype: torch.dtype | None = None,
    what: str = "pipeline",
    **kwargs: Any,
) -> tuple[Any, Any]:
    """``(pipeline, adapter)`` for ``spec``.

    ``spec``: ``tiny`` / ``tiny-flux`` / ``tiny-zimage`` (``:SEED`` optional), a local pipeline folder
    (``model_index.json`` names the class) or a hub id. ``backbone``: ``auto`` or a backbone name that the
    pipeline must match. ``what`` names the recipe key in error messages.

    Raises:
        FileNotFoundError: a missing folder, an unreachable hub id (offline), no model_index.json.
        ValueError: the pipeline is not of the requested backbone, or no adapter supports it.
    """
    from dinalrm_align.tiny import parse_tiny_id, tiny_pipeline

    tiny = parse_tiny_id(spec)
    if tiny is not None:
        family, seed = tiny
        pipe = tiny_pipeline(family, seed=seed)
        adapter = get_adapter(family)
    else:
        path = Path(spec).expanduser()
        if not path.exists() and looks_local(spec):
            raise FileNotFoundError(f"{what} folder not found: {spec}")
        if path.is_dir():
            name = _class_name_of_folder(path)
            if name is None:
                raise FileNotFoundError(f"{what} {spec} is not a diffusers pipeline folder (no model_index.json)")
            adapter = get_adapter(backbone) if backbone != "auto" else _adapter_by_pipeline_name(name, what, spec)
            pipe = adapter.load_pipeline(str(path), torch_dtype=torch_dtype, **kwargs)
        else:
            if backbone != "auto":
                adapter = get_adapter(backbone)
                pipe = adapter.load_pipeline(spec, torch_dtype=torch_dtype, **kwargs)
            else:
                from diffusers import DiffusionPipeline

                try:
                    pipe = DiffusionPipeline.from_pretrained(spec, **dtype_kwargs(torch_dtype), **kwargs)
                except (OSError, ValueError) as exc:
                    raise FileNotFoundError(
                        f"could not load the pipeline {spec!r} ({what}): {str(exc).splitlines()[0]}. Pass a local folder "
                        "or a reachable hub id (with HF_HUB_OFFLINE=1 only cached models load)."
                    ) from exc
                adapter = adapter_for(pipe)
    if backbone != "auto" and get_adapter(backbone).name != adapter.name:
        raise ValueError(f"{what} {spec!r} is a {adapter.name} pipeline, but the recipe says backbone {backbone!r}")
    if not adapter.matches(pipe):
        raise ValueError(f"{what} {spec!r} loaded a {type(pipe).__name__}, not a {adapter.pipeline_class_name}")
    return pipe, adapter
