"""One flow-matching sampling step: Euler ODE, Flow-GRPO SDE and CPS, with float32 log-probs.

Conventions (see ``docs/architecture.md``):

* ``x_sigma = (1 - sigma) * x0 + sigma * eps`` and the transformer predicts ``v = eps - x0``;
  sampling goes from ``sigma`` down to ``sigma_next < sigma`` so ``dt = sigma_next - sigma < 0``.
* ``latents``/``velocity``: ``(B, ...)`` (SD3: ``(B, 16, h, w)``). ``sigma``/``sigma_next``: a float,
  a 0-dim tensor or a ``(B,)`` tensor (one noise level per sample), broadcast over non-batch dims.
* All arithmetic is float32 (bf16 overflows in the SDE mean). The returned sample has dtype
  ``promote_types(latents.dtype, velocity.dtype)``; log-probs are float32 ``(B,)``, **averaged**
  (not summed) over all non-batch dims as in Flow-GRPO.
* The log-prob of a freshly sampled step is computed on the sample *after* it is cast to its output
  dtype, so recomputing the stored transition later gives exactly the same value (ratio == 1).
* ``noise_level == 0`` is the deterministic Euler step: ``log_prob`` and ``std`` are zeros and no
  random numbers are drawn.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "DEFAULT_NOISE_LEVEL",
    "SDE_TYPES",
    "StepOutput",
    "cps_step_with_logprob",
    "euler_step",
    "gaussian_log_prob",
    "predict_x0",
    "sde_step_with_logprob",
    "step_with_logprob",
]

#: Recommended ``noise_level`` per SDE type (Flow-GRPO: 0.7 for "sde", 0.8 for "cps").
DEFAULT_NOISE_LEVEL: dict[str, float] = {"sde": 0.7, "cps": 0.8}
SDE_TYPES: tuple[str, ...] = ("sde", "cps")

SigmaLike = float | torch.Tensor


class StepOutput(NamedTuple):
    """Result of one stochastic step.

    Attributes:
        prev_sample: the next latent ``(B, ...)`` (sampled, or the given ``prev_sample``).
        log_prob: float32 ``(B,)`` log-density of ``prev_sample`` (mean over non-batch dims);
            zeros for a deterministic step.
        mean: float32 ``(B, ...)`` mean of the Gaussian transition (carries grad from ``velocity``).
        std: float32 ``(B,)`` per-element std of the transition actually added to ``mean``
            (``std_dev_t * sqrt(-dt)`` for "sde", ``sigma_next * sin(noise_level * pi / 2)`` for "cps").
        kl_std: float32 ``(B,)`` the noise scale Flow-GRPO's closed-form KL divides by:
            ``std_dev_t = noise_level * sqrt(sigma / (1 - sigma))`` for "sde" (without the ``sqrt(-dt)``
            of the step), the step's ``std`` for "cps".
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    kl_std: torch.Tensor


def _check_pair(latents: torch.Tensor, velocity: torch.Tensor) -> None:
    if not isinstance(latents, torch.Tensor) or not isinstance(velocity, torch.Tensor):
        raise ValueError("latents and velocity must be tensors")
    if latents.ndim < 2:
        raise ValueError(f"latents must be batched (B, ...), got shape {tuple(latents.shape)}")
    if latents.shape != velocity.shape:
        raise ValueError(
            f"latents and velocity must have the same shape, got {tuple(latents.shape)} and {tuple(velocity.shape)}"
        )


def _sigma_view(sigma: SigmaLike, ref: torch.Tensor, name: str = "sigma") -> torch.Tensor:
    """``sigma`` as a float32 tensor of shape ``(B or 1, 1, ..., 1)`` matching ``ref.ndim``."""
    batch = ref.shape[0]
    if isinstance(sigma, bool):
        raise ValueError(f"{name} must be a float or a tensor, got a bool")
    if isinstance(sigma, (int, float)):
        s = torch.tensor(float(sigma), dtype=torch.float32, device=ref.device)
    elif isinstance(sigma, torch.Tensor):
        s = sigma.to(device=ref.device, dtype=torch.float32)
    else:
        raise ValueError(f"{name} must be a float or a tensor, got {type(sigma).__name__}")
    if s.ndim == 0:
        s = s.reshape(1)
    if s.ndim != 1 or s.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be a scalar or shape ({batch},) for batch {batch}, got {tuple(s.shape)}")
    return s.reshape(s.shape[0], *([1] * (ref.ndim - 1)))


def _out_dtype(latents: torch.Tensor, velocity: torch.Tensor) -> torch.dtype:
    return torch.promote_types(latents.dtype, velocity.dtype)


def _per_sample(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a ``(B or 1, 1, ...)`` tensor to a flat ``(B,)``."""
    return x.reshape(x.shape[0]).expand(batch).clone() if x.shape[0] == 1 else x.reshape(batch)


def _mean_over_nonbatch(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _check_decreasing(sigma: SigmaLike, sigma_next: SigmaLike) -> None:
    if isinstance(sigma, (int, float)) and isinstance(sigma_next, (int, float)):
        if not 0.0 <= sigma_next < sigma <= 1.0:
            raise ValueError(f"need 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")


def _noise(
    ref: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None
) -> torch.Tensor:
    if noise is not None:
        if noise.shape != ref.shape:
            raise ValueError(f"noise must have shape {tuple(ref.shape)}, got {tuple(noise.shape)}")
        return noise.to(device=ref.device, dtype=torch.float32)
    device = generator.device if generator is not None else ref.device
    eps = torch.randn(ref.shape, generator=generator, device=device, dtype=torch.float32)
    return eps.to(ref.device)


def _check_prev(prev_sample: torch.Tensor | None, ref: torch.Tensor) -> None:
    if prev_sample is not None and prev_sample.shape != ref.shape:
        raise ValueError(f"prev_sample must have shape {tuple(ref.shape)}, got {tuple(prev_sample.shape)}")


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: SigmaLike, sigma_next: SigmaLike) -> torch.Tensor:
    """Deterministic flow-matching Euler step ``x + (sigma_next - sigma) * v`` (float32 math).

    Bit-identical to diffusers' ``FlowMatchEulerDiscreteScheduler.step`` for same-dtype inputs.
    """
    _check_pair(latents, velocity)
    s = _sigma_view(sigma, latents)
    sn = _sigma_view(sigma_next, latents, "sigma_next")
    out = latents.float() + (sn - s) * velocity.float()
    return out.to(_out_dtype(latents, velocity))


def predict_x0(latents: torch.Tensor, velocity: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """One-step clean-latent prediction ``x0_hat = x - sigma * v`` (float32 math, differentiable)."""
    _check_pair(latents, velocity)
    s = _sigma_view(sigma, latents)
    return (latents.float() - s * velocity.float()).to(_out_dtype(latents, velocity))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Float32 log N(x; mean, std^2) per element, averaged over non-batch dims -> ``(B,)``.

    ``std`` broadcasts against ``x`` (e.g. ``(B, 1, 1, 1)``) and must be > 0.
    """
    x = x.float()
    std = std.float()
    lp = -((x - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return _mean_over_nonbatch(lp)


def _deterministic(latents, velocity, s, sn, prev_sample) -> StepOutput:
    batch = latents.shape[0]
    mean = latents.float() + (sn - s) * velocity.float()
    prev = mean.to(_out_dtype(latents, velocity)) if prev_sample is None else prev_sample
    zeros = torch.zeros(batch, dtype=torch.float32, device=latents.device)
    return StepOutput(prev, zeros, mean, zeros.clone(), zeros.clone())


def sde_step_with_logprob(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    sigma_max: float | None = None,
) -> StepOutput:
    """Flow-GRPO's marginal-preserving SDE step (Euler-Maruyama of the reverse SDE).

    With ``s = sigma``, ``dt = sigma_next - s < 0`` and ``a = noise_level``::

        std_dev_t = a * sqrt(s / (1 - s*))        # s* = s, except s* = sigma_max where s >= 1
        mean      = x * (1 + std_dev_t^2 / (2 s) * dt) + v * (1 + std_dev_t^2 * (1 - s) / (2 s)) * dt
        std       = std_dev_t * sqrt(-dt)
        prev      = mean + std * eps,  eps ~ N(0, I)
        log_prob  = mean over non-batch dims of log N(prev; mean, std^2)   (float32, with constants)

    ``sigma_max`` (default: ``sigma_next``, i.e. the schedule's second sigma for the first step, as in
    Flow-GRPO) replaces ``s`` in ``1 - s`` where ``s >= 1`` so the first SD3 step (``s = 1``) stays finite.
    If ``prev_sample`` is given it is not resampled: its log-prob under ``mean``/``std`` is returned
    (``prev_sample`` is detached; gradients flow through ``mean``). ``noise`` optionally fixes ``eps``.
    """
    _check_pair(latents, velocity)
    _check_prev(prev_sample, latents)
    _check_decreasing(sigma, sigma_next)
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    s = _sigma_view(sigma, latents)
    sn = _sigma_view(sigma_next, latents, "sigma_next")
    if noise_level == 0:
        return _deterministic(latents, velocity, s, sn, prev_sample)
    batch = latents.shape[0]
    x = latents.float()
    v = velocity.float()
    dt = sn - s
    s_sub = sn if sigma_max is None else torch.full_like(s, float(sigma_max))
    s_denom = torch.where(s >= 1.0, s_sub, s)
    std_dev_t = noise_level * torch.sqrt(s / (1.0 - s_denom))
    mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    std = std_dev_t * torch.sqrt(-dt)
    if prev_sample is None:
        prev_sample = (mean + std * _noise(x, generator, noise)).to(_out_dtype(latents, velocity))
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return StepOutput(prev_sample, log_prob, mean, _per_sample(std, batch), _per_sample(std_dev_t, batch))


def cps_step_with_logprob(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: float = 0.8,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """Coefficients-preserving sampling step (CPS, arXiv 2509.05952) as used by Flow-GRPO.

    With ``s = sigma``, ``s' = sigma_next`` and ``a = noise_level`` in [0, 1]::

        x0_hat   = x - s * v                     # predicted clean latent
        x1_hat   = x + (1 - s) * v               # predicted noise
        std      = s' * sin(a * pi / 2)
        mean     = (1 - s') * x0_hat + sqrt(s'^2 - std^2) * x1_hat     # sqrt(...) = s' * cos(a * pi / 2)
        prev     = mean + std * eps,  eps ~ N(0, I)
        log_prob = -mean over non-batch dims of (prev - mean)^2          # NO variance scaling / constants

    The total noise coefficient ``sqrt(s'^2 - std^2 + std^2) = s'`` is preserved, so with the exact
    velocity the next sample is again ``(1 - s') x0 + s' * noise``. The log-prob is Flow-GRPO's
    constant-free surrogate (not a normalised density); it is only meaningful in ratios of the same
    step. At ``s' = 0`` (last step) ``std = 0`` and the step is deterministic.
    """
    _check_pair(latents, velocity)
    _check_prev(prev_sample, latents)
    _check_decreasing(sigma, sigma_next)
    if not 0.0 <= noise_level <= 1.0:
        raise ValueError(f"cps noise_level must be in [0, 1], got {noise_level}")
    s = _sigma_view(sigma, latents)
    sn = _sigma_view(sigma_next, latents, "sigma_next")
    if noise_level == 0:
        return _deterministic(latents, velocity, s, sn, prev_sample)
    batch = latents.shape[0]
    x = latents.float()
    v = velocity.float()
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    std = sn * math.sin(noise_level * math.pi / 2)
    mean = (1 - sn) * x0_hat + torch.sqrt((sn**2 - std**2).clamp_min(0.0)) * x1_hat
    if prev_sample is None:
        prev_sample = (mean + std * _noise(x, generator, noise)).to(_out_dtype(latents, velocity))
    log_prob = -_mean_over_nonbatch((prev_sample.detach().float() - mean) ** 2)
    std_b = _per_sample(std * torch.ones_like(s), batch)
    return StepOutput(prev_sample, log_prob, mean, std_b, std_b.clone())


def step_with_logprob(
    sde_type: str,
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: float | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """Dispatch to :func:`sde_step_with_logprob` (``"sde"``) or :func:`cps_step_with_logprob` (``"cps"``).

    ``noise_level=None`` uses :data:`DEFAULT_NOISE_LEVEL` for the type.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    level = DEFAULT_NOISE_LEVEL[sde_type] if noise_level is None else float(noise_level)
    fn = sde_step_with_logprob if sde_type == "sde" else cps_step_with_logprob
    return fn(latents, velocity, sigma, sigma_next, level, prev_sample, generator, noise=noise)
