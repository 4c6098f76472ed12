"""Transformer calls and multi-step rollouts for SD3-style flow-matching policies.

``transformer`` is anything called like diffusers' ``SD3Transformer2DModel``
(``transformer(hidden_states=, timestep=, encoder_hidden_states=, pooled_projections=,
joint_attention_kwargs=, return_dict=False)[0]``), e.g. a peft/DDP-wrapped one. No function here
manages gradients: wrap rollouts in ``torch.no_grad()`` yourself; :func:`predict_velocity` and
:func:`step_log_prob` are differentiable when called with grad enabled.

Shapes: latents ``(B, C, H, W)``; ``prompt_embeds`` ``(B or 1, L, D)``; ``pooled`` ``(B or 1, P)``;
``sigmas`` ``(T + 1,)`` from :func:`dinalrm_align.sampling.schedule.inference_schedule`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .steps import (
    DEFAULT_NOISE_LEVEL,
    SDE_TYPES,
    StepOutput,
    euler_step,
    step_with_logprob,
)

__all__ = [
    "Trajectory",
    "choose_sde_window",
    "ode_rollout",
    "predict_velocity",
    "sde_rollout",
    "step_log_prob",
]

TimestepKind = Literal["auto", "sigma", "timestep"]


def _batched(x: torch.Tensor, batch: int, name: str, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a {ndim}-D tensor with batch 1 or {batch}, got {shape}")
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{name} has batch {x.shape[0]}, expected 1 or {batch} (latents batch)")


def _timesteps(
    sigma_or_timestep: float | torch.Tensor, batch: int, device: torch.device, kind: TimestepKind
) -> torch.Tensor:
    """Float32 ``(B,)`` transformer timesteps (``1000 * sigma``)."""
    if kind not in ("auto", "sigma", "timestep"):
        raise ValueError(f"timestep_kind must be 'auto', 'sigma' or 'timestep', got {kind!r}")
    if isinstance(sigma_or_timestep, bool) or not isinstance(sigma_or_timestep, (int, float, torch.Tensor)):
        raise ValueError(f"sigma_or_timestep must be a float or tensor, got {type(sigma_or_timestep).__name__}")
    t = torch.as_tensor(sigma_or_timestep, dtype=torch.float32).to(device)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"sigma_or_timestep must be a scalar or shape ({batch},), got {tuple(t.shape)}")
    if kind == "auto":
        kind = "timestep" if bool((t > 1.0).any()) else "sigma"
    if kind == "sigma":
        t = t * 1000.0
    return t.expand(batch)


def predict_velocity(
    transformer: Any,
    latents: torch.Tensor,
    sigma_or_timestep: float | torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    detach_uncond: bool = True,
    timestep_kind: TimestepKind = "auto",
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Velocity ``v`` ``(B, C, H, W)`` from ONE transformer forward, with optional CFG.

    ``sigma_or_timestep``: float / 0-dim / ``(B,)``. With ``timestep_kind="auto"`` values ``<= 1`` are
    sigmas (timestep ``1000 * sigma``, float32) and values ``> 1`` are already timesteps; pass
    ``"sigma"`` or ``"timestep"`` to skip the check (it syncs for device tensors).

    With ``guidance_scale > 1`` the negative (uncond) and positive batches are concatenated as
    ``[uncond, cond]`` (diffusers' order) into one forward and
    ``v = v_uncond + g * (v_cond - v_uncond)``; ``v_uncond`` is detached when ``detach_uncond`` so
    gradients flow through the conditional branch only (Flow-GRPO training). Negative embeddings
    may have batch 1 (broadcast) or ``B``. ``guidance_scale <= 1`` ignores the negatives.
    """
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, H, W), got {getattr(latents, 'shape', type(latents))}")
    batch = latents.shape[0]
    prompt_embeds = _batched(prompt_embeds, batch, "prompt_embeds", 3)
    pooled_prompt_embeds = _batched(pooled_prompt_embeds, batch, "pooled_prompt_embeds", 2)
    timestep = _timesteps(sigma_or_timestep, batch, latents.device, timestep_kind)
    do_cfg = guidance_scale > 1.0
    if do_cfg:
        if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
            raise ValueError(
                "guidance_scale > 1 needs negative_prompt_embeds and negative_pooled_prompt_embeds "
                "(e.g. the empty-prompt embedding)"
            )
        neg = _batched(negative_prompt_embeds, batch, "negative_prompt_embeds", 3)
        neg_pooled = _batched(negative_pooled_prompt_embeds, batch, "negative_pooled_prompt_embeds", 2)
        if neg.shape[1:] != prompt_embeds.shape[1:] or neg_pooled.shape[1:] != pooled_prompt_embeds.shape[1:]:
            raise ValueError(
                f"negative embeddings {tuple(neg.shape)}/{tuple(neg_pooled.shape)} do not match prompt "
                f"embeddings {tuple(prompt_embeds.shape)}/{tuple(pooled_prompt_embeds.shape)} beyond the batch dim"
            )
        hidden = torch.cat([latents, latents])
        encoder = torch.cat([neg, prompt_embeds])
        pooled = torch.cat([neg_pooled, pooled_prompt_embeds])
        timestep = torch.cat([timestep, timestep])
    else:
        hidden, encoder, pooled = latents, prompt_embeds, pooled_prompt_embeds
    out = transformer(
        hidden_states=hidden,
        timestep=timestep,
        encoder_hidden_states=encoder,
        pooled_projections=pooled,
        joint_attention_kwargs=joint_attention_kwargs,
        return_dict=False,
    )[0]
    if not do_cfg:
        return out
    v_uncond, v_cond = out.chunk(2)
    if detach_uncond:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def _check_sigmas(sigmas: torch.Tensor) -> int:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must be a 1-D tensor (T + 1,) with T >= 1, got {getattr(sigmas, 'shape', type(sigmas))}"
        )
    return sigmas.shape[0] - 1


def ode_rollout(
    transformer: Any,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    start: int = 0,
    stop: int | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Euler-integrate steps ``[start, stop)`` of ``sigmas`` and return the latent at ``sigmas[stop]``.

    ``noise`` is the latent at ``sigmas[start]`` (pure noise when ``start == 0``). With the same
    inputs this equals ``StableDiffusion3Pipeline(..., latents=noise, output_type="latent")``.
    No grad management inside: wrap in ``torch.no_grad()`` for sampling.
    """
    num_steps = _check_sigmas(sigmas)
    stop = num_steps if stop is None else stop
    if not 0 <= start <= stop <= num_steps:
        raise ValueError(f"need 0 <= start <= stop <= {num_steps}, got start={start}, stop={stop}")
    latents = noise
    for i in range(start, stop):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = predict_velocity(
            transformer, latents, sigma, prompt_embeds, pooled_prompt_embeds,
            guidance_scale=guidance_scale,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            timestep_kind="sigma",
            joint_attention_kwargs=joint_attention_kwargs,
        )
        latents = euler_step(latents, v, sigma, sigma_next)
    return latents


@dataclass
class Trajectory:
    """A sampled trajectory.

    Attributes:
        latents: ``(B, T + 1, C, H, W)``; ``latents[:, 0]`` is the start noise, ``latents[:, -1]`` the clean latent.
        log_probs: float32 ``(B, T)`` log-prob of each transition (0 for deterministic steps).
        sde_mask: bool ``(T,)``: step ``i`` was sampled stochastically (inside the SDE window with
            ``std > 0``); these are the trainable steps.
        timesteps: float32 ``(T,)`` transformer timesteps ``1000 * sigmas[:-1]``.
        sigmas: float32 ``(T + 1,)``.
        sde_type / noise_level: how the stochastic steps were drawn (for :func:`step_log_prob`).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sde_mask: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    sde_type: str = "sde"
    noise_level: float = 0.0

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def final_latents(self) -> torch.Tensor:
        """Clean latents ``(B, C, H, W)``."""
        return self.latents[:, -1]

    def train_steps(self) -> list[int]:
        """Indices of the stochastic (trainable) steps, ascending."""
        return [int(i) for i in torch.nonzero(self.sde_mask.cpu()).flatten()]

    def transition(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents[:, i], latents[:, i + 1])``."""
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step {i} out of range for a {self.num_steps}-step trajectory")
        return self.latents[:, i], self.latents[:, i + 1]


def sde_rollout(
    transformer: Any,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    sde_type: str = "sde",
    noise_level: float | None = None,
    sde_window: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> Trajectory:
    """Sample a full trajectory, stochastic inside ``sde_window`` and Euler (ODE) elsewhere.

    ``sde_window=(a, b)``: steps ``a <= i < b`` use the ``sde_type`` step (``"sde"``: Flow-GRPO SDE,
    ``"cps"``: coefficients-preserving); ``None`` = all steps. ``noise_level=None`` uses 0.7 ("sde") /
    0.8 ("cps"); ``noise_level=0`` gives the pure ODE trajectory. Random numbers come from
    ``generator`` (one ``randn`` of the latent shape per stochastic step). No grad management inside.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    level = DEFAULT_NOISE_LEVEL[sde_type] if noise_level is None else float(noise_level)
    num_steps = _check_sigmas(sigmas)
    if not isinstance(noise, torch.Tensor) or noise.ndim != 4:
        raise ValueError(f"noise must be (B, C, H, W), got {getattr(noise, 'shape', type(noise))}")
    lo, hi = (0, num_steps) if sde_window is None else (int(sde_window[0]), int(sde_window[1]))
    if not 0 <= lo <= hi <= num_steps:
        raise ValueError(f"sde_window must satisfy 0 <= start <= end <= {num_steps}, got {sde_window}")
    batch = noise.shape[0]
    latents = noise
    states = [latents]
    log_probs = torch.zeros(batch, num_steps, dtype=torch.float32, device=noise.device)
    mask = torch.zeros(num_steps, dtype=torch.bool)
    sigma_values = sigmas.detach().float().cpu().tolist()
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = predict_velocity(
            transformer, latents, sigma, prompt_embeds, pooled_prompt_embeds,
            guidance_scale=guidance_scale,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            timestep_kind="sigma",
            joint_attention_kwargs=joint_attention_kwargs,
        )
        stochastic = lo <= i < hi and level > 0 and not (sde_type == "cps" and sigma_values[i + 1] == 0.0)
        if stochastic:
            out = step_with_logprob(sde_type, latents, v, sigma, sigma_next, level, generator=generator)
            latents = out.prev_sample
            log_probs[:, i] = out.log_prob
            mask[i] = True
        else:
            latents = euler_step(latents, v, sigma, sigma_next)
        states.append(latents)
    return Trajectory(
        latents=torch.stack(states, dim=1),
        log_probs=log_probs,
        sde_mask=mask.to(noise.device),
        timesteps=(sigmas[:-1].float() * 1000.0),
        sigmas=sigmas.float(),
        sde_type=sde_type,
        noise_level=level,
    )


def step_log_prob(
    transformer: Any,
    latents_t: torch.Tensor,
    next_latents: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    *,
    sde_type: str = "sde",
    noise_level: float | None = None,
    guidance_scale: float = 1.0,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    detach_uncond: bool = True,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> StepOutput:
    """Recompute the log-prob of a stored transition ``latents_t -> next_latents`` (training pass).

    ``sigma``/``sigma_next``: float, 0-dim or ``(B,)``. Runs :func:`predict_velocity` (with grad if
    enabled) then the ``sde_type`` step with ``prev_sample=next_latents``; ``StepOutput.mean`` and
    ``.std`` feed :func:`dinalrm_align.algorithms.losses.gaussian_mean_kl` for the KL to a reference.
    Use the same ``sde_type``/``noise_level``/CFG as the rollout (``Trajectory.sde_type`` etc.).
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    if next_latents.shape != latents_t.shape:
        raise ValueError(
            f"next_latents {tuple(next_latents.shape)} must match latents_t {tuple(latents_t.shape)}"
        )
    v = predict_velocity(
        transformer, latents_t, sigma, prompt_embeds, pooled_prompt_embeds,
        guidance_scale=guidance_scale,
        negative_prompt_embeds=negative_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        detach_uncond=detach_uncond,
        timestep_kind="sigma",
        joint_attention_kwargs=joint_attention_kwargs,
    )
    return step_with_logprob(sde_type, latents_t, v, sigma, sigma_next, noise_level, prev_sample=next_latents)


def choose_sde_window(
    num_steps: int,
    window_size: int,
    window_range: tuple[int, int],
    generator: torch.Generator | random.Random | None = None,
) -> tuple[int, int]:
    """Random SDE window ``(start, start + window_size)`` inside the half-open step range ``window_range``.

    ``start`` is uniform over ``[lo, hi - window_size]`` (both inclusive) for ``window_range=(lo, hi)``;
    e.g. 10 steps, size 3, range ``(0, 5)`` -> windows within steps 0..4. ``generator``: a
    ``torch.Generator``, a ``random.Random`` or ``None`` (torch global RNG). Seed it identically on
    every rank if all ranks must train the same steps.
    """
    lo, hi = int(window_range[0]), int(window_range[1])
    if not 0 <= lo < hi <= num_steps:
        raise ValueError(f"window_range must satisfy 0 <= lo < hi <= num_steps={num_steps}, got {window_range}")
    if not 1 <= window_size <= hi - lo:
        raise ValueError(f"window_size must be in [1, {hi - lo}] for window_range {window_range}, got {window_size}")
    high = hi - window_size
    if isinstance(generator, random.Random):
        start = generator.randint(lo, high)
    else:
        start = int(torch.randint(lo, high + 1, (1,), generator=generator).item())
    return start, start + window_size
