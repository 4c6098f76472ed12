"""SD3 flow-matching inference schedule, exactly as diffusers builds it.

Convention: ``sigmas`` has ``num_steps + 1`` entries, descending from ``sigmas[0]`` (1.0 for SD3) to a
terminal ``0``; step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]`` and calls the transformer at
timestep ``timesteps[i] = 1000 * sigmas[i]`` (float32, the same multiplication diffusers does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["inference_schedule", "step_sigmas"]


def inference_schedule(
    scheduler_config: Mapping[str, Any],
    num_steps: int,
    device: torch.device | str | None = None,
    *,
    mu: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmas and timesteps of ``FlowMatchEulerDiscreteScheduler.from_config(cfg).set_timesteps(num_steps)``.

    Args:
        scheduler_config: the scheduler config (e.g. ``pipe.scheduler.config``; SD3: ``shift=3``).
        num_steps: number of sampling steps ``T`` (>= 1).
        device: where the returned tensors live.
        mu: only for configs with ``use_dynamic_shifting=True`` (not SD3); passed to ``set_timesteps``.

    Returns:
        ``(sigmas, timesteps)``: ``sigmas`` float32 ``(T + 1,)`` descending with terminal ``0``;
        ``timesteps`` float32 ``(T,)`` equal to ``sigmas[:-1] * num_train_timesteps`` (1000).
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
    if config.get("use_dynamic_shifting", False) and mu is None:
        raise ValueError("scheduler_config has use_dynamic_shifting=True: pass mu (SD3 does not use it)")
    if config.get("invert_sigmas", False):
        raise ValueError("invert_sigmas=True schedules are not supported (sigmas must descend to 0)")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(num_steps, device=device, mu=mu)
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32).clone()
    timesteps = scheduler.timesteps.to(device=device, dtype=torch.float32).clone()
    if sigmas.shape != (num_steps + 1,) or timesteps.shape != (num_steps,):
        raise ValueError(
            f"unexpected schedule shapes from diffusers: sigmas {tuple(sigmas.shape)}, "
            f"timesteps {tuple(timesteps.shape)} for num_steps={num_steps}"
        )
    return sigmas, timesteps


def step_sigmas(sigmas: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas[index], sigmas[index + 1])`` as 0-dim float32 tensors, with a bounds check."""
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D (T + 1,), got shape {tuple(sigmas.shape)}")
    num_steps = sigmas.shape[0] - 1
    if not 0 <= index < num_steps:
        raise ValueError(f"step index {index} out of range for a {num_steps}-step schedule")
    return sigmas[index].float(), sigmas[index + 1].float()
