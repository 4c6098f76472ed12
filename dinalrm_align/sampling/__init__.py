"""Flow-matching samplers, backbone-neutral.

``schedule``: inference sigmas exactly as diffusers' scheduler sets them; ``steps``: pure Euler / Flow-GRPO
SDE / CPS steps with float32 log-probs; ``rollout``: the :class:`Denoiser` (a policy as a velocity field,
optional CFG) and ODE / SDE rollouts.
Names are imported lazily so ``import dinalrm_align.sampling`` does not import torch or diffusers.
"""

from __future__ import annotations

from dinalrm_align._lazy import lazy_exports

_LAZY = {
    "inference_schedule": "schedule",
    "scheduler_schedule": "schedule",
    "resolution_shift": "schedule",
    "step_sigmas": "schedule",
    "DEFAULT_NOISE_LEVEL": "steps",
    "SDE_TYPES": "steps",
    "StepOutput": "steps",
    "cps_step_with_logprob": "steps",
    "euler_step": "steps",
    "gaussian_log_prob": "steps",
    "predict_x0": "steps",
    "sde_step_with_logprob": "steps",
    "step_with_logprob": "steps",
    "Denoiser": "rollout",
    "Trajectory": "rollout",
    "choose_sde_window": "rollout",
    "ode_rollout": "rollout",
    "sde_rollout": "rollout",
    "step_log_prob": "rollout",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
