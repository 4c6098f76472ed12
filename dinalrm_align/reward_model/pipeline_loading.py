"""Loading an SD3 pipeline from a hub id or a local folder with a clear offline error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_sd3_pipeline(
    id_or_path: str | Path,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
):
    """``StableDiffusion3Pipeline.from_pretrained`` with a ``FileNotFoundError`` naming the miss."""
    from diffusers import StableDiffusion3Pipeline

    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(id_or_path), torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"could not load the SD3 pipeline {str(id_or_path)!r}: {exc}. Pass a local folder or a hub id that is "
            "reachable (with HF_HUB_OFFLINE=1 only cached models load)."
        ) from exc
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
