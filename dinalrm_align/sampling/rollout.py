"""Policy calls and multi-step rollouts, backbone-neutral.

A :class:`Denoiser` is "the policy as a velocity field": a backbone adapter, a (possibly DDP / DeepSpeed /
peft wrapped) transformer and the guidance settings. Samplers only ever call ``denoiser(latents, sigma,
cond)``, so the same ODE / SDE / CPS code drives SD3.5, FLUX.1 and Z-Image. Nothing here manages
gradients: wrap rollouts in ``torch.no_grad()`` yourself; a denoiser call and :func:`step_log_prob` are
differentiable when grad is enabled.

Shapes: latents ``(B, C, h, w)`` (unpacked); ``cond`` a :class:`TextConditioning` of batch ``B`` (or 1);
``sigmas`` ``(T + 1,)`` from :meth:`BackboneAdapter.inference_schedule`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from dinalrm_align.backbones.conditioning import TextConditioning

from .steps import DEFAULT_NOISE_LEVEL, SDE_TYPES, StepOutput, euler_step, step_with_logprob

__all__ = ["Denoiser", "Trajectory", "choose_sde_window", "ode_rollout", "sde_rollout", "step_log_prob"]


@dataclass
class Denoiser:
    """Velocity ``v = noise - x0`` of a policy, with optional classifier-free guidance.

    Attributes:
        adapter: the backbone adapter (time convention, packing, sign of the output).
        transformer: the model to call (wrapped or not).
        guidance_scale: CFG scale in the standard convention ``v = v_u + g (v_c - v_u)``; ``<= 1`` is off.
        negative: conditioning of the unconditional branch (batch 1 or B); needed when CFG is on.
        guidance: embedded guidance of guidance-distilled models (FLUX.1-dev), None otherwise.
        detach_uncond: stop gradients through the unconditional branch (training with CFG).
    """

    adapter: Any
    transformer: Any
    guidance_scale: float = 1.0
    negative: TextConditioning | None = None
    guidance: float | None = None
    detach_uncond: bool = False
    joint_attention_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.guidance_scale > 1.0 and self.negative is None:
            raise ValueError("guidance_scale > 1 needs the negative (unconditional) conditioning, e.g. the empty prompt")

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def with_transformer(self, transformer: Any) -> Denoiser:
        """The same settings on another transformer (e.g. the unwrapped or the reference model)."""
        return replace(self, transformer=transformer)

    def _call(self, latents: torch.Tensor, sigma: float | torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        return self.adapter.velocity(
            self.transformer, latents, sigma, cond,
            guidance=self.guidance, joint_attention_kwargs=self.joint_attention_kwargs,
        )

    def __call__(self, latents: torch.Tensor, sigma: float | torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError(f"latents must be (B, C, h, w), got {getattr(latents, 'shape', type(latents).__name__)}")
        batch = latents.shape[0]
        cond = cond.expand(batch)
        if not self.cfg:
            return self._call(latents, sigma, cond)
        assert self.negative is not None
        neg, pos = self.negative.embeds.shape[1:], cond.embeds.shape[1:]
        if neg[1] != pos[1] or (neg[0] != pos[0] and not getattr(self.adapter, "variable_length_text", False)):
            raise ValueError(f"the negative conditioning {tuple(neg)} does not match the prompt conditioning {tuple(pos)} "
                             "(tokens, width): encode both with the same text stack and max_sequence_length")
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).reshape(-1).expand(batch)
        both = TextConditioning.cat([self.negative.expand(batch).to(cond.device), cond])
        out = self._call(torch.cat([latents, latents]), torch.cat([sig, sig]), both)
        v_uncond, v_cond = out.chunk(2)
        if self.detach_uncond:
            v_uncond = v_uncond.detach()
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)


def _check_sigmas(sigmas: torch.Tensor) -> int:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must be a 1-D tensor (T + 1,) with T >= 1, got {getattr(sigmas, 'shape', type(sigmas))}"
        )
    return sigmas.shape[0] - 1


def ode_rollout(
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: TextConditioning,
    *,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Euler-integrate steps ``[start, stop)`` of ``sigmas``; returns the latent at ``sigmas[stop]``.

    ``noise`` is the latent at ``sigmas[start]`` (pure noise when ``start == 0``). With the same inputs
    and the pipeline's own schedule this equals the pipeline's ``output_type="latent"`` result (unpacked).
    """
    num_steps = _check_sigmas(sigmas)
    stop = num_steps if stop is None else stop
    if not 0 <= start <= stop <= num_steps:
        raise ValueError(f"need 0 <= start <= stop <= {num_steps}, got start={start}, stop={stop}")
    latents = noise
    for i in range(start, stop):
        v = denoiser(latents, sigmas[i], cond)
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
    return latents


@dataclass
class Trajectory:
    """A sampled trajectory.

    Attributes:
        latents: ``(B, T + 1, C, h, w)``; ``latents[:, 0]`` the start noise, ``latents[:, -1]`` the clean latent.
        log_probs: float32 ``(B, T)`` log-prob of each transition (0 for deterministic steps).
        sde_mask: bool ``(T,)``: step ``i`` was stochastic (inside the SDE window, ``std > 0``): the
            trainable steps.
        sigmas: float32 ``(T + 1,)``.
        sde_type / noise_level: how the stochastic steps were drawn (for :func:`step_log_prob`).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sde_mask: torch.Tensor
    sigmas: torch.Tensor
    sde_type: str = "sde"
    noise_level: float = 0.0

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def final_latents(self) -> torch.Tensor:
        """Clean latents ``(B, C, h, w)``."""
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
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: TextConditioning,
    *,
    sde_type: str = "sde",
    noise_level: float | None = None,
    sde_window: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Sample a trajectory, stochastic inside ``sde_window`` and Euler (ODE) elsewhere.

    ``sde_window=(a, b)``: steps ``a <= i < b`` use the ``sde_type`` step (``"sde"``: Flow-GRPO SDE,
    ``"cps"``: coefficients-preserving); ``None`` = all steps. ``noise_level=None``: 0.7 ("sde") / 0.8
    ("cps"); 0 gives the ODE trajectory. Random numbers come from ``generator`` (one ``randn`` of the
    latent shape per stochastic step).
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    level = DEFAULT_NOISE_LEVEL[sde_type] if noise_level is None else float(noise_level)
    num_steps = _check_sigmas(sigmas)
    if not isinstance(noise, torch.Tensor) or noise.ndim != 4:
        raise ValueError(f"noise must be (B, C, h, w), got {getattr(noise, 'shape', type(noise))}")
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
        v = denoiser(latents, sigma, cond)
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
        sigmas=sigmas.float(),
        sde_type=sde_type,
        noise_level=level,
    )


def step_log_prob(
    denoiser: Denoiser,
    latents_t: torch.Tensor,
    next_latents: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    cond: TextConditioning,
    *,
    sde_type: str = "sde",
    noise_level: float | None = None,
) -> StepOutput:
    """Recompute the log-prob of a stored transition ``latents_t -> next_latents`` (the training pass).

    Runs the denoiser (with grad if enabled) then the ``sde_type`` step with ``prev_sample=next_latents``;
    ``StepOutput.mean`` / ``.kl_std`` feed :func:`dinalrm_align.algorithms.losses.gaussian_mean_kl`.
    Use the same ``sde_type`` / ``noise_level`` / guidance as the rollout.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    if next_latents.shape != latents_t.shape:
        raise ValueError(f"next_latents {tuple(next_latents.shape)} must match latents_t {tuple(latents_t.shape)}")
    v = denoiser(latents_t, sigma, cond)
    return step_with_logprob(sde_type, latents_t, v, sigma, sigma_next, noise_level, prev_sample=next_latents)


def choose_sde_window(
    num_steps: int,
    window_size: int,
    window_range: tuple[int, int],
    generator: torch.Generator | random.Random | None = None,
) -> tuple[int, int]:
    """Random SDE window ``(start, start + window_size)`` inside the half-open step range ``window_range``.

    ``start`` is uniform over ``[lo, hi - window_size]`` (inclusive); e.g. 10 steps, size 3, range
    ``(0, 5)`` -> windows within steps 0..4. Seed ``generator`` identically on every process if all
    processes must train the same steps.
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
