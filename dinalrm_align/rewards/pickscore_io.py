"""PickScore plumbing: loading the CLIP model and processor (clear offline errors), dtypes and devices, and
the processor's image settings replayed in torch (resize, centre crop) so that scoring needs no PIL round trip."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
#: PIL resampling codes -> torch interpolation modes (PIL's BICUBIC = 3 is CLIP's).
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
#: Tolerance on the [0, 1] range (decoders may overshoot by rounding); values are clamped after.
RANGE_TOL = 1e-3

# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be a floating dtype (float32, float16, bfloat16), got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[key]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``: this process' GPU (``LOCAL_RANK`` under a launcher, else the current one) or the CPU."""
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit() and int(local) < torch.cuda.device_count():
        return torch.device("cuda", int(local))
    return torch.device("cuda", torch.cuda.current_device())


def _load(what: str, id_or_path: str | os.PathLike, loader: Any) -> Any:
    """``loader(path_or_id)`` for a local folder or a hub id; a miss is a FileNotFoundError naming it."""
    name = os.fspath(id_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"PickScore {what} {name!r} is a file; expected a folder or a Hugging Face repo id"
            )
        source = str(path)
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"PickScore {what} folder not found: {name}")
    else:
        source = name
    try:
        return loader(source)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = (
            "HF_HUB_OFFLINE is set: only models already in the cache load. " if offline else ""
        ) + "Download it first (huggingface-cli download ...) or pass a local folder."
        raise FileNotFoundError(
            f"could not load the PickScore {what} {name!r} ({type(exc).__name__}: {exc}). {hint}"
        ) from exc


def load_model(model: Any) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model
    from transformers import AutoModel

    return _load("model", model, AutoModel.from_pretrained)


def load_processor(processor: Any) -> Any:
    if not isinstance(processor, (str, os.PathLike)):
        return processor
    from transformers import AutoProcessor

    return _load("processor", processor, AutoProcessor.from_pretrained)


def size_entry(size: Any, key: str) -> int | None:
    """``size[key]`` of a dict (transformers 4) or a ``SizeDict`` (transformers 5), else None."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return None if value is None else int(value)


def image_settings(processor: Any) -> dict[str, Any]:
    """Resize / crop / normalisation settings read from the processor's image-processor config."""
    ip = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if ip is None or tokenizer is None:
        raise ValueError(
            f"the PickScore processor must have an image_processor and a tokenizer (a CLIPProcessor), "
            f"got {type(processor).__name__}"
        )
    size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
    shortest = size_entry(size, "shortest_edge")
    resize_hw = None
    if shortest is None and size_entry(size, "height") and size_entry(size, "width"):
        resize_hw = (size_entry(size, "height"), size_entry(size, "width"))
    do_resize = bool(getattr(ip, "do_resize", True)) and (shortest is not None or resize_hw is not None)
    crop_hw = (size_entry(crop, "height"), size_entry(crop, "width"))
    do_crop = bool(getattr(ip, "do_center_crop", True)) and None not in crop_hw
    if not do_resize and not do_crop:
        raise ValueError("the PickScore image processor defines neither a resize nor a crop size")
    resample = getattr(ip, "resample", 3)
    resample = int(getattr(resample, "value", resample)) if resample is not None else 3
    do_norm = bool(getattr(ip, "do_normalize", True))
    mean = getattr(ip, "image_mean", None) if do_norm else None
    std = getattr(ip, "image_std", None) if do_norm else None
    return {
        "shortest_edge": shortest if do_resize else None,
        "resize_hw": resize_hw if do_resize else None,
        "crop_hw": crop_hw if do_crop else None,
        "mode": RESAMPLE.get(resample, "bicubic"),
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
    }


def clip_features(out: Any) -> torch.Tensor:
    """Projected embeddings from ``get_*clip_features`` (a tensor in transformers 4, an output object in 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """HF's centre crop: offsets ``(side - crop) // 2``; sides smaller than the crop are zero-padded first."""
    ch, cw = size
    h, w = x.shape[-2:]
    if h < ch or w < cw:  # pad (centred, extra pixel at the start as HF's ceil) then crop
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        top, left = math.ceil(ph / 2), math.ceil(pw / 2)
        x = F.pad(x, (left, pw - left, top, ph - top))
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]
