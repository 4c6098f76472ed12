"""Input and output checks with clear ``ValueError`` messages (never a deep torch error or silent garbage)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Largest accepted absolute value of a latent, noise or text-embedding entry. SD3-normalised latents
#: are ~N(0, 1), so 1e4 is a generous bound that only rejects garbage (uninitialised memory, wrongly
#: scaled buffers, values like 1e30). Beyond ~1e4 scores stop depending on the input scale (layer
#: norms), and from ~1e20 the float32 layer norms overflow and the score is NaN without any error.
MAX_INPUT_MAGNITUDE = 1e4


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


def check_magnitude(x: torch.Tensor, name: str, bound: float = MAX_INPUT_MAGNITUDE) -> None:
    """Raise if any ``|x| > bound`` (finite values assumed; skipped on the meta device)."""
    if x.device.type == "meta" or x.numel() == 0:
        return
    peak = float(x.detach().abs().max())
    if peak > bound:
        raise ValueError(
            f"{name} holds values up to {peak:.3g} in magnitude; at most {bound:g} is accepted "
            f"(SD3-normalised latents and prompt embeddings are O(1)); such inputs make the score NaN "
            "or meaningless: check what was passed (e.g. uninitialised or wrongly scaled tensors)"
        )


def check_latents(
    latents: object,
    *,
    in_channels: int,
    patch_size: int,
    max_side: int | None = None,
    name: str = "latents",
    backbone: str = "",
) -> torch.Tensor:
    """``latents`` must be unpacked (B, in_channels, h, w), h and w multiples of ``patch_size`` and at most
    ``max_side`` (the transformer's position grid, if it has one), finite and ``|x| <= MAX_INPUT_MAGNITUDE``."""
    x = _require_tensor(latents, name)
    family = f"the {backbone} " if backbone else "the "
    if x.dim() != 4:
        hint = " (FLUX pipelines return packed (B, N, 64) latents: unpack them first)" if x.dim() == 3 else ""
        raise ValueError(f"{name} must be 4-D (B, C, h, w), got shape {tuple(x.shape)}{hint}")
    b, c, h, w = x.shape
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if c != in_channels:
        raise ValueError(
            f"{name} must have {in_channels} channels for {family}backbone, got {c} (shape {tuple(x.shape)})"
        )
    if h % patch_size or w % patch_size:
        raise ValueError(f"{name} height and width must be multiples of {patch_size} for {family}backbone, got {h}x{w}")
    if max_side is not None and (h > max_side or w > max_side):
        raise ValueError(
            f"{name} of {h}x{w} exceed {family}transformer's position grid: at most {max_side}x{max_side} latent pixels"
        )
    check_finite(x, name)
    check_magnitude(x, name)
    return x


def check_text_conditions(
    prompt_embeds: object,
    pooled_prompt_embeds: object,
    *,
    batch_size: int,
    joint_attention_dim: int,
    pooled_projection_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeds (B, L, joint_attention_dim) and pooled embeds (B, pooled_projection_dim), finite and
    ``|x| <= MAX_INPUT_MAGNITUDE``."""
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
    check_magnitude(pe, "prompt_embeds")
    check_magnitude(pooled, "pooled_prompt_embeds")
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
    """``noise`` must have exactly ``expected_shape``, be finite and ``|x| <= MAX_INPUT_MAGNITUDE``."""
    x = _require_tensor(noise, name)
    if tuple(x.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have shape {tuple(expected_shape)}, got {tuple(x.shape)}")
    check_finite(x, name)
    check_magnitude(x, name)
    return x


def check_scores(raw: torch.Tensor, model_dtype: torch.dtype | None = None, name: str = "reward") -> torch.Tensor:
    """Raise if the model output ``raw`` ((B,) or (B, out_dim)) holds NaN or Inf; returns ``raw`` unchanged.

    Inputs have passed :func:`check_latents` / :func:`check_text_conditions` by then, so a
    non-finite score comes from inside the model; the message names the rows and likely causes.
    ``model_dtype`` (the weights' dtype) is only used in the message.
    """
    if raw.device.type == "meta" or raw.numel() == 0:
        return raw
    finite = torch.isfinite(raw.detach()).reshape(raw.shape[0], -1).all(dim=1)
    if bool(finite.all()):
        return raw
    rows = torch.nonzero(~finite).flatten().tolist()
    shown = ", ".join(str(r) for r in rows[:16]) + (", ..." if len(rows) > 16 else "")
    dtype = f" (weights in {model_dtype})" if model_dtype is not None else ""
    raise ValueError(
        f"the reward model returned non-finite {name} values for {len(rows)} of {raw.shape[0]} row(s) "
        f"[{shown}] although its inputs were finite and within +-{MAX_INPUT_MAGNITUDE:g}; likely causes: "
        "NaN/Inf weights (a diverged training run or a damaged checkpoint) or an overflow in float16"
        f"{dtype}: load the model in float32 or bfloat16"
    )
