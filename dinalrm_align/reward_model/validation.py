"""Input checks with clear ``ValueError`` messages (never a deep torch error or silent garbage)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _require_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise if ``x`` contains NaN or Inf (skipped on the meta device, where there are no values)."""
    if x.device.type == "meta":
        return
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_latents(
    latents: object,
    *,
    in_channels: int,
    patch_size: int,
    pos_embed_max_size: int | None,
    name: str = "latents",
) -> torch.Tensor:
    """``latents`` must be (B, in_channels, H, W), H and W divisible by the patch size and within the
    position-embedding grid (``pos_embed_max_size * patch_size``), finite."""
    x = _require_tensor(latents, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if b == 0:
        raise ValueError(f"{name} has an empty batch")
    if c != in_channels:
        raise ValueError(
            f"{name} must have {in_channels} channels (the transformer's in_channels), got {c} (shape {tuple(x.shape)})"
        )
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"{name} height and width must be divisible by the patch size {patch_size}, got {h}x{w}"
        )
    if pos_embed_max_size is not None:
        limit = pos_embed_max_size * patch_size
        if h > limit or w > limit:
            raise ValueError(
                f"{name} of {h}x{w} exceed the position-embedding grid: at most {limit}x{limit} latent pixels "
                f"(pos_embed_max_size={pos_embed_max_size}, patch size {patch_size})"
            )
    check_finite(x, name)
    return x


def check_text_conditions(
    prompt_embeds: object,
    pooled_prompt_embeds: object,
    *,
    batch_size: int,
    joint_attention_dim: int,
    pooled_projection_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeds (B, L, joint_attention_dim) and pooled embeds (B, pooled_projection_dim)."""
    pe = _require_tensor(prompt_embeds, "prompt_embeds")
    pooled = _require_tensor(pooled_prompt_embeds, "pooled_prompt_embeds")
    if pe.dim() != 3:
        raise ValueError(f"prompt_embeds must be 3-D (B, L, D), got shape {tuple(pe.shape)}")
    if pooled.dim() != 2:
        raise ValueError(f"pooled_prompt_embeds must be 2-D (B, D), got shape {tuple(pooled.shape)}")
    if pe.shape[0] != batch_size or pooled.shape[0] != batch_size:
        raise ValueError(
            f"batch sizes disagree: latents {batch_size}, prompt_embeds {pe.shape[0]}, "
            f"pooled_prompt_embeds {pooled.shape[0]}"
        )
    if pe.shape[-1] != joint_attention_dim:
        raise ValueError(
            f"prompt_embeds width {pe.shape[-1]} does not match the transformer's joint_attention_dim {joint_attention_dim}"
        )
    if pooled.shape[-1] != pooled_projection_dim:
        raise ValueError(
            f"pooled_prompt_embeds width {pooled.shape[-1]} does not match the transformer's "
            f"pooled_projection_dim {pooled_projection_dim}"
        )
    check_finite(pe, "prompt_embeds")
    check_finite(pooled, "pooled_prompt_embeds")
    return pe, pooled


def check_noise_levels(us: Sequence[float] | float | torch.Tensor, name: str = "u") -> list[float]:
    """Each noise level must be a finite number in [0, 1]."""
    if isinstance(us, torch.Tensor):
        values = [float(v) for v in us.detach().reshape(-1).tolist()]
    elif isinstance(us, (int, float)) and not isinstance(us, bool):
        values = [float(us)]
    elif isinstance(us, Sequence) and not isinstance(us, str):
        values = []
        for v in us:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must contain numbers in [0, 1], got {v!r}")
            values.append(float(v))
    else:
        raise ValueError(f"{name} must be a number in [0, 1], got {us!r}")
    if not values:
        raise ValueError(f"{name} must name at least one noise level")
    for v in values:
        if not (0.0 <= v <= 1.0):  # also rejects NaN
            raise ValueError(f"{name} must lie in [0, 1] (it is the target noise level sigma), got {v}")
    return values


def check_noise(noise: object, expected_shape: Sequence[int], name: str = "noise") -> torch.Tensor:
    """``noise`` must have exactly ``expected_shape`` and be finite."""
    x = _require_tensor(noise, name)
    if tuple(x.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have shape {tuple(expected_shape)}, got {tuple(x.shape)}")
    check_finite(x, name)
    return x
