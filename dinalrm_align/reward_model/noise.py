"""Noise convention of DiNa-LRM (pure functions).

``u`` is the *target* flow-matching noise level sigma, not a timestep index. The sigma actually
used is the nearest entry of the scheduler's construction-time sigma table, which for SD3.5
(1000 train steps, shift 3, no dynamic shifting) is ``sigma_i = 3 s_i / (1 + 2 s_i)`` with
``s_i = (1000 - i) / 1000``: 1.0 down to ~0.003, no terminal zero. The transformer timestep is
``1000 * sigma`` (a float). Noising is rectified-flow interpolation
``x_sigma = (1 - sigma) * x0 + sigma * noise``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

#: Scheduler config of SD3.5-Medium's ``FlowMatchEulerDiscreteScheduler`` (the default table).
SD35_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}


def sigma_table(scheduler_config: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's construction-time ``(sigmas, timesteps)``, each ``(num_train_timesteps,)`` float32.

    Built with diffusers' ``FlowMatchEulerDiscreteScheduler.from_config`` so that the table is
    bit-identical to the one the pipeline's scheduler holds. Descending; no terminal zero.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(SD35_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = scheduler.sigmas.detach().to(torch.float32).cpu().clone()
    timesteps = scheduler.timesteps.detach().to(torch.float32).cpu().clone()
    return sigmas, timesteps


def nearest_sigma(
    u: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest table entry to each target noise level.

    Args:
        u: target sigma(s), shape ``(B,)`` (any float dtype), values in [0, 1].
        sigmas, timesteps: the table from :func:`sigma_table`, shape ``(N,)``.

    Returns:
        ``(sigma, timestep)``, each ``(B,)`` float32 on ``u``'s device. Ties go to the first
        (larger-sigma) entry, as ``argmin`` does.
    """
    u = u.to(torch.float32).reshape(-1)
    table = sigmas.to(u.device)
    idx = torch.argmin((table[None, :] - u[:, None]).abs(), dim=1)
    return table[idx], timesteps.to(u.device)[idx]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation ``(1 - sigma) * x0 + sigma * noise``.

    ``x0`` and ``noise`` are ``(B, C, H, W)``; ``sigma`` is ``(B,)`` (broadcast over C, H, W).
    The result has the promoted dtype of ``x0`` and ``sigma`` (float32 sigma promotes bf16 latents,
    like the reference implementation).
    """
    sigma = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - sigma) * x0 + sigma * noise
