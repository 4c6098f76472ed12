"""GRPO's recipe section and its batching arithmetic (see :mod:`dinalrm_align.algorithms.grpo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dinalrm_align.trainer.config import ProxyRewardConfig
from dinalrm_align.trainer.sections import AlgorithmConfig

__all__ = ["BatchingPlan", "GRPOConfig", "trained_steps_per_sample"]


@dataclass
class GRPOConfig(AlgorithmConfig):
    """``algorithm`` section of a GRPO recipe.

    Batching: ``train.batch_size`` is samples per process per rollout
    batch (and the nominal training chunk), ``train.gradient_accumulation_steps`` is chunks per
    optimizer step.

    Attributes:
        group_size: k, images per prompt; ``batch_size x processes`` must be a multiple of it.
        num_batches_per_epoch: rollout batches per process per epoch (= training chunks per epoch);
            must be a multiple of ``train.gradient_accumulation_steps``.
        sde_type: ``sde`` (Flow-GRPO SDE) or ``cps`` (coefficients-preserving sampling).
        noise_level: SDE noise level; ``None`` = 0.7 for ``sde``, 0.8 for ``cps``. Must be > 0
            (``noise_level=0`` is the ODE, used by evaluation).
        sde_window_size: stochastic steps per rollout (0: every step stochastic). Only window
            steps are trained.
        sde_window_range: half-open step range ``[lo, hi)`` the window is drawn in (once per rollout
            batch, identical on all processes); default ``(0, num_steps // 2)``.
        timestep_fraction: without a window, train the first ``int(S x fraction)`` of the ``S``
            stochastic steps (Flow-GRPO's 0.99 -> 9 of 10: the last, deterministic-looking step is not trained).
        cfg: classifier-free guidance (``sampling.guidance_scale``, ``sampling.negative_prompt``)
            in rollouts AND training. Off in the fast configs.
        detach_uncond: with ``cfg``, stop gradients through the unconditional branch of the training
            forward (the DiNa-LRM alignment fork does not; Flow-GRPO does).
        clip_range: PPO clip range on the ratio (tiny: 1e-5 .. 1e-4; the DiNa-LRM recipe uses 3e-6).
        adv_clip_max: advantages are clamped to +-this.
        kl_beta: weight of the closed-form KL to the reference policy (the policy with its LoRA
            disabled; needs ``model.finetune: lora``). 0 disables the reference forward.
        kl_form: ``flow_grpo``: ``mean ||mu - mu_ref||^2 / (2 std_t^2)`` with Flow-GRPO's noise scale
            ``std_t`` (for "sde" ``noise_level * sqrt(sigma / (1 - sigma))``, without the step's
            ``sqrt(-dt)``; for "cps" the step's std); ``transition``: the exact KL of the two Gaussian
            transitions (divides by the step's variance, i.e. a factor ``1 / -dt`` stronger for "sde").
        global_std: normalise by the std of all gathered rewards of the epoch instead of the group's.
        filter_zero_std: drop samples of groups whose reward has zero std (no learning signal).
        latent_reward_name: component name of the latent reward (``reward`` section's model).
        reward_weights: ``{component: weight}``; components without a weight (or weight 0) are
            only logged. Default ``{<latent_reward_name>: 1.0}``.
        advantage_mode: ``per_component`` (normalise each weighted component per group, then sum:
            the DiNa-LRM recipe's "DiNa advantage + 0.2 x PickScore advantage") or ``sum`` (weighted
            sum of rewards, then normalise: component scales matter).
        extra_rewards: other reward callables (``pkg.module:callable``): called as
            ``fn(images (B,3,H,W) in [0,1] or latents (B,16,h,w), prompts)`` per ``inputs``, or with
            keywords if the object speaks :mod:`dinalrm_align.rewards.protocol`; they return B scores
            (tensor / list / ``(scores, info)`` / ``{"avg": ...}``). Images are decoded only if one
            of them asks for images.
        shuffle_chunks: shuffle this process' samples before splitting them into training chunks.
            Off: chunk ``i`` is rollout batch ``i`` (ratio exactly 1 before an update).
        reward_seed: base seed of the reward's re-noising (default: the run's ``seed``).
    """

    name: str = "grpo"
    group_size: int = 8
    num_batches_per_epoch: int = 2
    sde_type: Literal["sde", "cps"] = "sde"
    noise_level: float | None = None
    sde_window_size: int = 0
    sde_window_range: tuple[int, int] | None = None
    timestep_fraction: float = 0.99
    cfg: bool = False
    detach_uncond: bool = False
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    kl_beta: float = 0.0
    kl_form: Literal["flow_grpo", "transition"] = "flow_grpo"
    global_std: bool = True
    filter_zero_std: bool = True
    latent_reward_name: str = "dina_lrm"
    reward_weights: dict[str, float] | None = None
    advantage_mode: Literal["per_component", "sum"] = "per_component"
    extra_rewards: list[ProxyRewardConfig] = field(default_factory=list)
    shuffle_chunks: bool = True
    reward_seed: int | None = None

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"algorithm.group_size must be >= 2 (advantages compare samples of a prompt), got {self.group_size}")
        if self.num_batches_per_epoch < 1:
            raise ValueError(f"algorithm.num_batches_per_epoch must be >= 1, got {self.num_batches_per_epoch}")
        if self.noise_level is not None and self.noise_level <= 0:
            raise ValueError(
                f"algorithm.noise_level must be > 0 for training (got {self.noise_level}); noise_level 0 is the "
                "deterministic ODE used for evaluation"
            )
        if self.sde_type == "cps" and self.noise_level is not None and self.noise_level > 1:
            raise ValueError(f"algorithm.noise_level for sde_type 'cps' must be in (0, 1], got {self.noise_level}")
        if self.sde_window_size < 0:
            raise ValueError(f"algorithm.sde_window_size must be >= 0, got {self.sde_window_size}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"algorithm.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if not self.clip_range > 0:
            raise ValueError(f"algorithm.clip_range must be > 0, got {self.clip_range}")
        if not self.adv_clip_max > 0:
            raise ValueError(f"algorithm.adv_clip_max must be > 0, got {self.adv_clip_max}")
        if self.kl_beta < 0:
            raise ValueError(f"algorithm.kl_beta must be >= 0, got {self.kl_beta}")
        if self.reward_weights is None:
            self.reward_weights = {self.latent_reward_name: 1.0}
        names = [self.latent_reward_name] + [r.name for r in self.extra_rewards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward component names must be unique, got duplicates {dupes} (algorithm.extra_rewards)")
        unknown = sorted(set(self.reward_weights) - set(names))
        if unknown:
            raise ValueError(
                f"algorithm.reward_weights names unknown components {unknown}; components: {', '.join(names)}"
            )
        if not any(w != 0 for w in self.reward_weights.values()):
            raise ValueError("algorithm.reward_weights must give at least one component a non-zero weight")

    @property
    def weights(self) -> dict[str, float]:
        """The non-zero reward weights."""
        return {k: float(w) for k, w in (self.reward_weights or {}).items() if w != 0}

    @property
    def level(self) -> float:
        """The noise level actually used."""
        from dinalrm_align.sampling.steps import DEFAULT_NOISE_LEVEL

        return DEFAULT_NOISE_LEVEL[self.sde_type] if self.noise_level is None else float(self.noise_level)

    def window_range(self, num_steps: int) -> tuple[int, int]:
        return tuple(self.sde_window_range) if self.sde_window_range is not None else (0, num_steps // 2)  # type: ignore[return-value]


def trained_steps_per_sample(config: GRPOConfig, num_steps: int) -> int:
    """Trained (stochastic) steps per rollout for ``num_steps`` sampling steps; ValueError if none.

    With a window: ``sde_window_size`` (the window must avoid the deterministic last "cps" step).
    Without: ``int(S x timestep_fraction)`` of the ``S`` stochastic steps (``S = T`` for "sde",
    ``T - 1`` for "cps", whose last step to sigma 0 has zero noise).
    """
    stochastic = num_steps - 1 if config.sde_type == "cps" else num_steps
    if config.sde_window_size > 0:
        lo, hi = config.window_range(num_steps)
        if not 0 <= lo < hi <= stochastic:
            raise ValueError(
                f"algorithm.sde_window_range {(lo, hi)} must satisfy 0 <= lo < hi <= {stochastic} for "
                f"{num_steps} {config.sde_type!r} steps"
                + (" (the last cps step is deterministic)" if config.sde_type == "cps" else "")
            )
        if config.sde_window_size > hi - lo:
            raise ValueError(
                f"algorithm.sde_window_size {config.sde_window_size} does not fit in sde_window_range {(lo, hi)}"
            )
        return config.sde_window_size
    trained = int(stochastic * config.timestep_fraction)
    if trained < 1:
        raise ValueError(
            f"no trained steps: {stochastic} stochastic steps x timestep_fraction {config.timestep_fraction} < 1"
        )
    return trained


@dataclass(frozen=True)
class BatchingPlan:
    """The batching arithmetic of a GRPO run (all counts per epoch unless stated)."""

    processes: int
    batch_size: int
    group_size: int
    batches_per_epoch: int
    accumulation: int
    trained_steps: int

    def __post_init__(self) -> None:
        global_batch = self.batch_size * self.processes
        if global_batch % self.group_size:
            raise ValueError(
                f"train.batch_size {self.batch_size} x {self.processes} processes = {global_batch} samples per "
                f"rollout batch is not a multiple of algorithm.group_size {self.group_size}"
            )
        if self.batches_per_epoch % self.accumulation:
            raise ValueError(
                f"algorithm.num_batches_per_epoch {self.batches_per_epoch} must be a multiple of the gradient "
                f"accumulation ({self.accumulation} chunks per optimizer step, train.gradient_accumulation_steps / "
                "train.global_batch_size) so that every epoch ends on an optimizer step"
            )

    @property
    def prompts_per_batch(self) -> int:
        return self.batch_size * self.processes // self.group_size

    @property
    def groups_per_epoch(self) -> int:
        return self.prompts_per_batch * self.batches_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        return self.batch_size * self.processes * self.batches_per_epoch

    @property
    def updates_per_epoch(self) -> int:
        return self.batches_per_epoch // self.accumulation

    @property
    def micro_steps_per_update(self) -> int:
        return self.accumulation * self.trained_steps

    def format(self) -> str:
        return (
            f"grpo batching: {self.processes} process(es) x {self.batch_size} samples x {self.batches_per_epoch} "
            f"rollout batches = {self.samples_per_epoch} samples per epoch ({self.groups_per_epoch} prompts x "
            f"{self.group_size}); {self.trained_steps} trained step(s) per sample; optimizer step every "
            f"{self.accumulation} chunk(s) = {self.micro_steps_per_update} micro-steps -> "
            f"{self.updates_per_epoch} optimizer step(s) per epoch"
        )
