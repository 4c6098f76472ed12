"""Preference losses and noise-level samplers for reward-model training (pure functions).

Convention: ``r_pos`` / ``r_neg`` are the raw rewards (B,) of the chosen / rejected latent of each
pair, both scored at the SAME noise level ``sigma`` (B,) with the SAME noise draw.

- ``thurstone`` (default, DiNa-LRM): perceived quality ``r + eta``, ``eta ~ N(0, v(sigma))`` per image
  with ``v(sigma) = 2 sigma^2 + 0.05``; ``P = Phi((r_pos - r_neg) / sqrt(v_pos + v_neg + 1e-6))``;
  fidelity loss ``mean(1 - sqrt(P + 1e-6))``.
- ``thurstone-constant``: the same with ``v = 0.5`` per image (the paper's "fixed variance" ablation).
- ``bt``: Bradley-Terry ``mean(-log sigmoid(r_pos - r_neg))``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "LOSSES",
    "U_SAMPLERS",
    "bradley_terry_loss",
    "fidelity_loss",
    "fixed_variance_thurstone_loss",
    "noise_variance",
    "preference_loss",
    "sample_u",
    "thurstone_fidelity_loss",
    "thurstone_probability",
]

LossName = Literal["thurstone", "thurstone-constant", "bt"]
#: Loss names accepted by :func:`preference_loss` (and the ``loss.name`` recipe key).
LOSSES: tuple[str, ...] = ("thurstone", "thurstone-constant", "bt")
#: Noise-level samplers accepted by :func:`sample_u`.
U_SAMPLERS: tuple[str, ...] = ("uniform", "logit_normal")

#: Released constants of the noise-calibrated variance ``v(sigma) = K * sigma^2 + FLOOR``.
VARIANCE_SCALE = 2.0
VARIANCE_FLOOR = 0.05
#: Per-image variance of the fixed-variance Thurstone model.
CONSTANT_VARIANCE = 0.5
EPS = 1e-6


def _check_pair(r_pos: torch.Tensor, r_neg: torch.Tensor) -> None:
    if not isinstance(r_pos, torch.Tensor) or not isinstance(r_neg, torch.Tensor):
        raise ValueError("r_pos and r_neg must be tensors")
    if r_pos.shape != r_neg.shape or r_pos.dim() != 1 or r_pos.numel() == 0:
        raise ValueError(
            f"r_pos and r_neg must be non-empty 1-D tensors of the same shape (B,), got "
            f"{tuple(r_pos.shape)} and {tuple(r_neg.shape)}"
        )


def noise_variance(
    sigma: torch.Tensor, scale: float = VARIANCE_SCALE, floor: float = VARIANCE_FLOOR
) -> torch.Tensor:
    """Per-image perception variance ``v(sigma) = scale * sigma^2 + floor`` (same shape as ``sigma``)."""
    return scale * sigma.float() ** 2 + floor


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def thurstone_probability(
    r_pos: torch.Tensor, r_neg: torch.Tensor, var_pos: torch.Tensor | float, var_neg: torch.Tensor | float
) -> torch.Tensor:
    """``P(pos > neg) = Phi((r_pos - r_neg) / sqrt(var_pos + var_neg + 1e-6))`` -> (B,) float32."""
    _check_pair(r_pos, r_neg)
    total = torch.as_tensor(var_pos, dtype=torch.float32, device=r_pos.device) + torch.as_tensor(
        var_neg, dtype=torch.float32, device=r_pos.device
    )
    return _normal_cdf((r_pos.float() - r_neg.float()) / torch.sqrt(total + EPS))


def fidelity_loss(prob: torch.Tensor) -> torch.Tensor:
    """Fidelity loss for label "first is preferred": ``mean(1 - sqrt(P + 1e-6))`` (scalar)."""
    return (1.0 - torch.sqrt(prob.float() + EPS)).mean()


def thurstone_fidelity_loss(
    r_pos: torch.Tensor,
    r_neg: torch.Tensor,
    sigma: torch.Tensor,
    *,
    scale: float = VARIANCE_SCALE,
    floor: float = VARIANCE_FLOOR,
) -> torch.Tensor:
    """Noise-calibrated Thurstone fidelity loss; ``sigma`` (B,) is the pair's shared noise level."""
    _check_pair(r_pos, r_neg)
    sigma = sigma.reshape(-1).to(r_pos.device)
    if sigma.shape != r_pos.shape:
        raise ValueError(f"sigma must have shape {tuple(r_pos.shape)}, got {tuple(sigma.shape)}")
    v = noise_variance(sigma, scale, floor)
    return fidelity_loss(thurstone_probability(r_pos, r_neg, v, v))


def fixed_variance_thurstone_loss(
    r_pos: torch.Tensor, r_neg: torch.Tensor, variance: float = CONSTANT_VARIANCE
) -> torch.Tensor:
    """Thurstone fidelity loss with a constant per-image variance (``P = Phi(dr / sqrt(2 v + 1e-6))``)."""
    return fidelity_loss(thurstone_probability(r_pos, r_neg, variance, variance))


def bradley_terry_loss(r_pos: torch.Tensor, r_neg: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood ``mean(-log sigmoid(r_pos - r_neg))``."""
    _check_pair(r_pos, r_neg)
    return torch.nn.functional.softplus(-(r_pos.float() - r_neg.float())).mean()


def preference_loss(
    name: str,
    r_pos: torch.Tensor,
    r_neg: torch.Tensor,
    sigma: torch.Tensor | None = None,
    *,
    variance_scale: float = VARIANCE_SCALE,
    variance_floor: float = VARIANCE_FLOOR,
    constant_variance: float = CONSTANT_VARIANCE,
) -> torch.Tensor:
    """Dispatch on the loss ``name`` (one of :data:`LOSSES`); ``sigma`` is required for ``thurstone``."""
    if name == "thurstone":
        if sigma is None:
            raise ValueError("the 'thurstone' loss needs the pairs' noise levels sigma")
        return thurstone_fidelity_loss(r_pos, r_neg, sigma, scale=variance_scale, floor=variance_floor)
    if name == "thurstone-constant":
        return fixed_variance_thurstone_loss(r_pos, r_neg, constant_variance)
    if name == "bt":
        return bradley_terry_loss(r_pos, r_neg)
    raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")


def sample_u(
    n: int,
    sampler: str = "uniform",
    *,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """Target noise levels ``u`` (n,) float32 in [low, high] (map them to table sigmas with ``rm.sigma_for``).

    ``uniform``: ``U(low, high)``. ``logit_normal``: ``sigmoid(N(logit_mean, logit_std^2))`` rescaled
    into [low, high] (mass concentrated around mid noise levels).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    if sampler == "uniform":
        u = torch.rand(n, generator=generator)
    elif sampler == "logit_normal":
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    else:
        raise ValueError(f"unknown u sampler {sampler!r}; valid samplers: {', '.join(U_SAMPLERS)}")
    return (low + (high - low) * u).float()
