"""Flow-matching inference schedules, built by diffusers' own scheduler exactly as the pipelines do.

Convention: ``sigmas`` has ``num_steps + 1`` entries, descending to a terminal ``0``; step ``i`` goes
from ``sigmas[i]`` to ``sigmas[i + 1]``. ``timesteps[i] = num_train_timesteps * sigmas[i]`` (1000 sigma)
is the scheduler's timestep; how a family feeds time to its transformer is its adapter's business.
Per-family spacing (explicit sigmas, the resolution shift ``mu``) comes from the backbone adapter:
:meth:`dinalrm_align.backbones.base.BackboneAdapter.inference_schedule`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["inference_schedule", "resolution_shift", "scheduler_schedule", "step_sigmas"]


def resolution_shift(scheduler_config: Mapping[str, Any], image_seq_len: int) -> float:
    """The resolution-dependent shift ``mu`` of FLUX-style schedules: linear in the image token count
    between ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)`` (defaults
    256 -> 0.5 and 4096 -> 1.15, as diffusers' pipelines)."""
    base_len = float(scheduler_config.get("base_image_seq_len", 256))
    max_len = float(scheduler_config.get("max_image_seq_len", 4096))
    base_shift = float(scheduler_config.get("base_shift", 0.5))
    max_shift = float(scheduler_config.get("max_shift", 1.15))
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def scheduler_schedule(
    scheduler_config: Mapping[str, Any],
    num_steps: int,
    device: torch.device | str | None = None,
    *,
    sigmas: Sequence[float] | None = None,
    mu: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``FlowMatchEulerDiscreteScheduler.from_config(cfg).set_timesteps(...)`` -> ``(sigmas, timesteps)``.

    Args:
        scheduler_config: e.g. ``pipe.scheduler.config``.
        num_steps: number of sampling steps ``T`` (>= 1).
        sigmas: explicit (unshifted) sigmas the pipeline passes (FLUX / Z-Image: ``linspace(1, 1/T, T)``).
        mu: resolution shift for ``use_dynamic_shifting`` configs (ignored by static-shift ones).

    Returns:
        ``sigmas`` float32 ``(T + 1,)`` descending with terminal ``0`` and ``timesteps`` float32 ``(T,)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(scheduler_config, Mapping):
        raise ValueError(
            f"scheduler_config must be a dict-like scheduler config (e.g. pipe.scheduler.config), "
            f"got {type(scheduler_config).__name__}"
        )
    config = {k: v for k, v in scheduler_config.items() if not str(k).startswith("_")}
    if config.get("invert_sigmas", False):
        raise ValueError("invert_sigmas=True schedules are not supported (sigmas must descend to 0)")
    if config.get("use_dynamic_shifting", False) and mu is None:
        raise ValueError("scheduler_config has use_dynamic_shifting=True: pass mu (the resolution shift)")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs: dict[str, Any] = {"device": device}
    if mu is not None:
        kwargs["mu"] = mu
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=list(sigmas), **kwargs)
    else:
        scheduler.set_timesteps(num_steps, **kwargs)
    out_sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32).clone()
    timesteps = scheduler.timesteps.to(device=device, dtype=torch.float32).clone()
    if out_sigmas.shape != (num_steps + 1,) or timesteps.shape != (num_steps,):
        raise ValueError(
            f"unexpected schedule shapes from diffusers: sigmas {tuple(out_sigmas.shape)}, "
            f"timesteps {tuple(timesteps.shape)} for num_steps={num_steps}"
        )
    return out_sigmas, timesteps


def inference_schedule(
    scheduler_config: Mapping[str, Any],
    num_steps: int,
    device: torch.device | str | None = None,
    *,
    mu: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's own spacing (SD3's pipeline): ``set_timesteps(num_steps)`` (+ ``mu`` if dynamic)."""
    return scheduler_schedule(scheduler_config, num_steps, device=device, mu=mu)


def step_sigmas(sigmas: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas[index], sigmas[index + 1])`` as 0-dim float32 tensors, with a bounds check."""
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D (T + 1,), got shape {tuple(sigmas.shape)}")
    num_steps = sigmas.shape[0] - 1
    if not 0 <= index < num_steps:
        raise ValueError(f"step index {index} out of range for a {num_steps}-step schedule")
    return sigmas[index].float(), sigmas[index + 1].float()
