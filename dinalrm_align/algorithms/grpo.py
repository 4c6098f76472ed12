"""GRPO (Flow-GRPO style) with the latent reward on the final clean latents.

One *epoch* (``dina_lrm.md`` section 5.2, ``anchors.md`` section 2.2)::

    rollouts   algorithm.num_batches_per_epoch batches of train.batch_size samples per process; each
               global batch holds m = batch_size * processes / group_size prompts x group_size samples
               (k-repeat sampler: a group may span processes). Stochastic steps ("sde" / "cps") with
               float32 log-probs inside the SDE window, Euler (ODE) elsewhere; no grad.
    rewards    DiNa-LRM on the final clean latents (no VAE decode, no grad, re-noising seeded per
               global sample index) + optional extra rewards (latents or decoded images), per component.
    advantages rewards gathered from all processes -> per-prompt (r - mean) / std (or global std),
               per component then weighted (DiNa + 0.2 x PickScore) or on the weighted sum;
               clipped; zero-std groups dropped.
    training   this process' kept samples (shuffled) in num_batches_per_epoch chunks; one
               ``train_step`` per chunk, one micro-step per trained step (the SDE window):
               PPO-clip on exp(logp_new - logp_old) + kl_beta x closed-form KL to the LoRA-disabled
               policy. An optimizer step every train.gradient_accumulation_steps chunks.

Batching arithmetic (printed at start, see :class:`BatchingPlan`)::

    micro-steps per optimizer step = train.gradient_accumulation_steps x trained steps per sample
    optimizer steps per epoch      = num_batches_per_epoch / train.gradient_accumulation_steps
    samples per epoch              = num_batches_per_epoch x batch_size x processes

With one optimizer step per epoch every ratio is exactly 1 (pure on-policy policy gradient); with
more, later chunks are trained by an updated policy and the clip range matters.

The trainer's prompt stream is :class:`~dinalrm_align.trainer.grouping.KRepeatSampler` (supplied by
:meth:`GRPO.build_sampler`): the first ``train_step`` of an epoch receives the epoch's prompts and
runs the rollouts, the others receive ``[]`` and train on the stored rollouts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import torch

from dinalrm_align.algorithms.base import Algorithm, TrainContext
from dinalrm_align.trainer.config import AlgorithmConfig, ProxyRewardConfig
from dinalrm_align.trainer.grouping import KRepeatSampler, prompt_group_ids, stable_hash

if TYPE_CHECKING:  # pragma: no cover
    from dinalrm_align.trainer.config import TrainConfig
    from dinalrm_align.trainer.evaluation import ProxyReward

logger = logging.getLogger("dinalrm_align.grpo")

__all__ = [
    "BatchingPlan",
    "GRPO",
    "GRPOConfig",
    "GroupAdvantages",
    "RolloutBuffer",
    "compute_advantages",
    "make_chunks",
    "trained_steps_per_sample",
]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig(AlgorithmConfig):
    """``algorithm`` section of a GRPO recipe.

    Batching (see the module docstring): ``train.batch_size`` is samples per process per rollout
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
            stochastic steps (Flow-GRPO's 0.99 -> 9 of 10).
        cfg: classifier-free guidance (``sampling.guidance_scale``, ``sampling.negative_prompt``)
            in rollouts AND training (the unconditional branch is detached). Off in the fast configs.
        clip_range: PPO clip range on the ratio (tiny: 1e-5 .. 1e-4; the DiNa-LRM recipe uses 3e-6).
        adv_clip_max: advantages are clamped to +-this.
        kl_beta: weight of the closed-form KL to the reference policy (the policy with its LoRA
            disabled; needs ``model.finetune: lora``). 0 disables the reference forward.
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
    timestep_fraction: float = 1.0
    cfg: bool = False
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    kl_beta: float = 0.0
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


# ----------------------------------------------------------------------------------------------
# Pure helpers: advantages and chunking
# ----------------------------------------------------------------------------------------------


class GroupAdvantages(NamedTuple):
    """Advantages of one gathered epoch.

    Attributes:
        advantages: float32 ``(N,)``, clipped; exactly 0 for dropped samples.
        keep: bool ``(N,)``; False for samples of zero-std groups when filtering.
        zero_std_ratio: fraction of groups whose (weighted) rewards have zero std.
        num_groups: number of groups (distinct prompts).
    """

    advantages: torch.Tensor
    keep: torch.Tensor
    zero_std_ratio: float
    num_groups: int


def compute_advantages(
    components: Mapping[str, torch.Tensor],
    group_ids: torch.Tensor | Sequence[Any],
    weights: Mapping[str, float],
    *,
    mode: str = "per_component",
    global_std: bool = False,
    adv_clip_max: float | None = 5.0,
    filter_zero_std: bool = True,
    eps: float = 1e-4,
) -> GroupAdvantages:
    """Per-prompt GRPO advantages of rewards gathered from ALL processes.

    Args:
        components: ``{name: (N,) rewards}`` (same order as ``group_ids``).
        group_ids: ``(N,)`` ids (e.g. :func:`~dinalrm_align.trainer.grouping.prompt_group_ids`) or prompts.
        weights: ``{name: weight}``; zero weights are ignored.
        mode: ``per_component`` (:func:`combine_advantages`) or ``sum`` (:func:`sum_then_normalize`).
        global_std: one std over all samples instead of per group.
        adv_clip_max: clamp to ``+-adv_clip_max`` (None: no clipping).
        filter_zero_std: mark samples of zero-std groups as not kept (their advantage is 0 anyway).

    A group is zero-std when every weighted component (``per_component``) or the weighted sum
    (``sum``) is constant within it; groups of one sample count as zero-std.
    """
    from dinalrm_align.algorithms.advantages import (
        as_group_ids,
        clip_advantages,
        combine_advantages,
        sum_then_normalize,
        zero_std_mask,
    )

    used = {k: float(w) for k, w in weights.items() if w != 0}
    if not used:
        raise ValueError("weights must give at least one component a non-zero weight")
    missing = sorted(set(used) - set(components))
    if missing:
        raise ValueError(f"weights name components {missing} that were not computed; have {sorted(components)}")
    if mode == "per_component":
        adv = combine_advantages(components, used, group_ids, global_std, eps=eps)
        zero = None
        for name in used:
            z = zero_std_mask(components[name], group_ids)
            zero = z if zero is None else zero & z
        assert zero is not None
    elif mode == "sum":
        adv = sum_then_normalize(components, used, group_ids, global_std, eps=eps)
        total = sum(w * components[k].double() for k, w in used.items())
        assert isinstance(total, torch.Tensor)
        zero = zero_std_mask(total, group_ids)
    else:
        raise ValueError(f"advantage mode must be 'per_component' or 'sum', got {mode!r}")
    if adv_clip_max is not None:
        adv = clip_advantages(adv, adv_clip_max)
    n = adv.shape[0]
    inverse, num_groups = as_group_ids(group_ids, n, device=adv.device)
    zero_groups = torch.zeros(num_groups, dtype=torch.bool, device=adv.device)
    zero_groups[inverse[zero]] = True
    adv = torch.where(zero, torch.zeros_like(adv), adv)
    keep = ~zero if filter_zero_std else torch.ones_like(zero)
    return GroupAdvantages(adv, keep, float(zero_groups.float().mean()), num_groups)


def make_chunks(keep: torch.Tensor, num_chunks: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Split this process' kept samples into ``num_chunks`` training chunks (index tensors).

    Kept samples (shuffled with ``generator`` if given) are split into ``num_chunks`` chunks whose
    sizes differ by at most one. If fewer than ``num_chunks`` samples are kept, every chunk holds
    one sample and the missing ones are filled with dropped samples (zero advantage), so that every
    process runs the same number of micro-steps (as Flow-GRPO re-adds dropped samples).
    """
    if keep.ndim != 1 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a 1-D bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    if keep.numel() < num_chunks:
        raise ValueError(f"cannot make {num_chunks} chunks from {keep.numel()} samples")
    keep = keep.cpu()
    kept = torch.nonzero(keep).flatten()
    dropped = torch.nonzero(~keep).flatten()
    if generator is not None:
        kept = kept[torch.randperm(kept.numel(), generator=generator)]
        dropped = dropped[torch.randperm(dropped.numel(), generator=generator)]
    if kept.numel() >= num_chunks:
        return [c.clone() for c in torch.tensor_split(kept, num_chunks)]
    filled = torch.cat([kept, dropped[: num_chunks - kept.numel()]])
    return [filled[i : i + 1].clone() for i in range(num_chunks)]


def _seeded_normal(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal draws, sample ``i`` from its own CPU generator."""
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        out.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# Rollout storage
# ----------------------------------------------------------------------------------------------


@dataclass
class RolloutBuffer:
    """This process' rollouts of the current epoch, kept for training.

    Shapes (``N`` samples, ``W`` trained steps, ``U`` distinct prompts on this process):
    ``latents (N, W + 1, C, h, w)`` (the trained transitions are ``latents[:, j] -> latents[:, j + 1]``),
    ``log_probs (N, W)`` float32 (sampling-time), ``sigmas (N, W + 1)`` float32, ``advantages (N,)``,
    ``embed_index (N,)`` into ``prompt_embeds (U, L, D)`` / ``pooled (U, P)``; ``chunks``: index
    tensors of the training chunks not yet trained.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    advantages: torch.Tensor
    embed_index: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    chunks: list[torch.Tensor]

    _TENSORS: ClassVar[tuple[str, ...]] = (
        "latents", "log_probs", "sigmas", "advantages", "embed_index", "prompt_embeds", "pooled",
    )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: getattr(self, k).detach().cpu() for k in self._TENSORS}
        state["chunks"] = [c.cpu() for c in self.chunks]
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device | str | None = None) -> RolloutBuffer:
        tensors = {k: state[k].to(device) for k in cls._TENSORS}
        return cls(**tensors, chunks=[c.clone() for c in state["chunks"]])


class _EmbeddingStore:
    """Prompt embeddings of one epoch, encoded once per distinct prompt on this process."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.pe: list[torch.Tensor] = []
        self.pooled: list[torch.Tensor] = []

    def lookup(self, ctx: TrainContext, prompts: Sequence[str]) -> torch.Tensor:
        """Indices ``(B,)`` of ``prompts`` (new prompts are encoded)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.index]
        if new:
            pe, pooled = ctx.encode(new)
            for i, p in enumerate(new):
                self.index[p] = len(self.pe)
                self.pe.append(pe[i])
                self.pooled.append(pooled[i])
        return torch.tensor([self.index[p] for p in prompts], dtype=torch.long, device=ctx.device)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the stored prompts ``index`` -> ``(B, L, D)``, ``(B, P)``."""
        ids = index.tolist()
        return torch.stack([self.pe[i] for i in ids]), torch.stack([self.pooled[i] for i in ids])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored embeddings ``(U, L, D)``, ``(U, P)``."""
        return torch.stack(self.pe), torch.stack(self.pooled)


@dataclass
class _ExtraReward:
    """An extra reward component (positional ``fn(x, prompts)`` or the latent-reward keyword protocol)."""

    proxy: ProxyReward

    @property
    def name(self) -> str:
        return self.proxy.name

    @property
    def keyword(self) -> bool:
        return hasattr(self.proxy.fn, "required_fields")

    @property
    def needs_images(self) -> bool:
        return not self.keyword and self.proxy.inputs == "images"

    def __call__(
        self,
        latents: torch.Tensor,
        images: torch.Tensor | None,
        prompts: list[str],
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
    ) -> torch.Tensor:
        """Scores ``(B,)`` float32 on the CPU."""
        if self.keyword:
            fn = self.proxy.fn
            fields = set(getattr(fn, "required_fields", ())) | set(getattr(fn, "optional_fields", ()))
            available = {"prompts": prompts, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
            out = fn(latents=latents, **{k: v for k, v in available.items() if k in fields})
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(prompts),):
                raise ValueError(
                    f"reward {self.name!r} returned {getattr(out, 'shape', type(out).__name__)}, expected a ({len(prompts)},) tensor"
                )
            return out.detach().float().cpu()
        x = images if self.needs_images else latents
        return torch.tensor(self.proxy(x, prompts), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------


class GRPO(Algorithm):
    """Flow-GRPO style GRPO with the latent reward on final clean latents (see the module docstring)."""

    name: ClassVar[str] = "grpo"
    config_class: ClassVar[type[AlgorithmConfig]] = GRPOConfig
    config: GRPOConfig

    def __init__(self, config: GRPOConfig) -> None:
        super().__init__(config)
        self._trained_steps: int | None = None
        self._sigmas: torch.Tensor | None = None
        self._extras: list[_ExtraReward] = []
        self._device: torch.device = torch.device("cpu")
        self.plan: BatchingPlan | None = None
        self.epoch = 0
        self.buffer: RolloutBuffer | None = None
        self.epoch_metrics: dict[str, float] = {}
        #: Diagnostics of the last rollout epoch on this process (tests, debugging).
        self.last_rollout: dict[str, Any] = {}

    # ------------------------------------------------------------------ interface
    @property
    def micro_steps_per_batch(self) -> int:
        if self._trained_steps is None:
            raise RuntimeError("GRPO.validate(config) must run before micro_steps_per_batch is known")
        return self._trained_steps

    def validate(self, config: TrainConfig) -> None:
        from dinalrm_align.algorithms.base import import_object
        from dinalrm_align.trainer.accelerator import launched_world_size

        c = self.config
        self._trained_steps = trained_steps_per_sample(c, config.sampling.num_steps)
        if c.cfg and config.sampling.guidance_scale <= 1.0:
            raise ValueError(
                f"algorithm.cfg: true needs sampling.guidance_scale > 1, got {config.sampling.guidance_scale}"
            )
        if c.kl_beta > 0 and config.model.finetune != "lora":
            raise ValueError(
                "algorithm.kl_beta > 0 needs a LoRA policy (model.finetune: lora): the KL reference is the "
                "policy with its LoRA disabled"
            )
        world = launched_world_size()
        self.plan = BatchingPlan(
            processes=world,
            batch_size=config.train.batch_size,
            group_size=c.group_size,
            batches_per_epoch=c.num_batches_per_epoch,
            accumulation=config.train.accumulation_for(world),
            trained_steps=self._trained_steps,
        )
        for extra in c.extra_rewards:
            import_object(extra.target)

    def build_sampler(
        self,
        prompts: Sequence[str],
        *,
        batch_size: int,
        num_processes: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
    ) -> KRepeatSampler:
        """The k-repeat prompt stream (``shuffle`` is ignored: groups are always shuffled)."""
        return KRepeatSampler(
            prompts, batch_size, self.config.group_size,
            num_processes=num_processes, rank=rank, seed=seed, batches_per_epoch=self.config.num_batches_per_epoch,
        )

    def setup(self, ctx: TrainContext) -> None:
        from dinalrm_align.sampling.schedule import inference_schedule
        from dinalrm_align.trainer.evaluation import load_proxy_rewards

        cfg = ctx.config
        self.validate(cfg)
        steps = self.micro_steps_per_batch
        accumulation = ctx.accelerator.gradient_accumulation_steps // steps
        self.plan = BatchingPlan(
            processes=ctx.num_processes,
            batch_size=cfg.train.batch_size,
            group_size=self.config.group_size,
            batches_per_epoch=self.config.num_batches_per_epoch,
            accumulation=accumulation,
            trained_steps=steps,
        )
        self._device = ctx.device
        self._sigmas, _ = inference_schedule(ctx.pipeline.scheduler.config, cfg.sampling.num_steps, device=ctx.device)
        self._extras = [_ExtraReward(p) for p in load_proxy_rewards(self.config.extra_rewards)]
        every = cfg.checkpoint.every
        if every and every % self.plan.updates_per_epoch and ctx.accelerator.is_main_process:
            logger.warning(
                "checkpoint.every=%d is not a multiple of the %d optimizer steps per epoch: mid-epoch checkpoints "
                "also store the epoch's remaining rollouts", every, self.plan.updates_per_epoch,
            )
        if ctx.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"[dinalrm-align] {self.plan.format()}")

    def _guidance(self, ctx: TrainContext) -> float:
        return ctx.config.sampling.guidance_scale if self.config.cfg else 1.0

    # ------------------------------------------------------------------ rollouts
    def _global_index(self, ctx: TrainContext, batch: int, i: int) -> int:
        """Index of sample ``i`` of rollout batch ``batch`` of this epoch among all samples of the run."""
        b, world = ctx.config.train.batch_size, ctx.num_processes
        per_epoch = self.config.num_batches_per_epoch * b * world
        return self.epoch * per_epoch + batch * b * world + ctx.process_index * b + i

    def _window(self, ctx: TrainContext, batch: int) -> tuple[int, int] | None:
        from dinalrm_align.sampling.rollout import choose_sde_window

        if self.config.sde_window_size <= 0:
            return None
        n = ctx.config.sampling.num_steps
        g = torch.Generator().manual_seed(stable_hash("grpo-window", ctx.config.seed, self.epoch, batch))
        return choose_sde_window(n, self.config.sde_window_size, self.config.window_range(n), generator=g)

    @torch.no_grad()
    def _score(
        self,
        ctx: TrainContext,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        prompts: list[str],
        sample_ids: list[int],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Reward components ``{name: (B,) float32}`` and the raw latent reward ``(B,)``, no grad."""
        rcfg = ctx.config.reward
        base = ctx.config.seed if self.config.reward_seed is None else self.config.reward_seed
        seeds = [stable_hash("grpo-reward", base, s) for s in sample_ids]
        noise = _seeded_normal(seeds, (rcfg.n_noise, *ctx.latent_shape)).transpose(0, 1).to(ctx.device)
        raw = ctx.reward_model.score(
            latents.float(), prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled,
            u=rcfg.u, noise=noise, n_noise=rcfg.n_noise,
        ).float()
        comps = {self.config.latent_reward_name: ctx.normalize_reward(raw).float()}
        if self._extras:
            images = None
            if any(e.needs_images for e in self._extras):
                from dinalrm_align.trainer.evaluation import decode_latents

                images = decode_latents(ctx.pipeline, latents)
            for extra in self._extras:
                comps[extra.name] = extra(latents, images, prompts, prompt_embeds, pooled).to(ctx.device)
        return comps, raw

    def _rollout_epoch(self, ctx: TrainContext, prompts: list[str]) -> None:
        """Sample, score, gather and normalise one epoch; fills :attr:`buffer` and :attr:`epoch_metrics`."""
        from dinalrm_align.algorithms.advantages import rank_slice
        from dinalrm_align.sampling.rollout import sde_rollout

        assert self._sigmas is not None and self.plan is not None
        cfg, c = ctx.config, self.config
        bsz, nb, steps = cfg.train.batch_size, c.num_batches_per_epoch, self.micro_steps_per_batch
        if len(prompts) != nb * bsz:
            raise ValueError(
                f"GRPO expects the epoch's {nb} x {bsz} prompts from its k-repeat sampler, got {len(prompts)}; "
                "the trainer must take its prompt stream from Algorithm.build_sampler"
            )
        acc, device = ctx.accelerator, ctx.device
        guidance = self._guidance(ctx)
        store = _EmbeddingStore()
        lat, lps, sig, eidx, windows = [], [], [], [], []
        comps: dict[str, list[torch.Tensor]] = {}
        raws: list[torch.Tensor] = []
        t0 = time.perf_counter()
        transformer = ctx.transformer
        was_training = transformer.training
        transformer.eval()
        try:
            for b in range(nb):
                batch_prompts = prompts[b * bsz : (b + 1) * bsz]
                idx = store.lookup(ctx, batch_prompts)
                pe, pooled = store.rows(idx)
                ids = [self._global_index(ctx, b, i) for i in range(bsz)]
                z0 = _seeded_normal([stable_hash("grpo-z0", cfg.seed, s) for s in ids], ctx.latent_shape).to(device)
                neg_pe, neg_pooled = ctx.negative(bsz) if guidance > 1.0 else (None, None)
                window = self._window(ctx, b)
                gen = torch.Generator().manual_seed(stable_hash("grpo-sde", cfg.seed, self.epoch, b, ctx.process_index))
                with torch.no_grad(), ctx.autocast():
                    traj = sde_rollout(
                        transformer, z0, self._sigmas, pe, pooled,
                        guidance_scale=guidance,
                        negative_prompt_embeds=neg_pe,
                        negative_pooled_prompt_embeds=neg_pooled,
                        sde_type=c.sde_type,
                        noise_level=c.level,
                        sde_window=window,
                        generator=gen,
                    )
                trained = traj.train_steps()[:steps]
                if len(trained) != steps or trained != list(range(trained[0], trained[0] + steps)):
                    raise RuntimeError(f"rollout has trainable steps {traj.train_steps()}, expected {steps} consecutive")
                s0 = trained[0]
                lat.append(traj.latents[:, s0 : s0 + steps + 1])
                lps.append(traj.log_probs[:, s0 : s0 + steps].float())
                sig.append(self._sigmas[s0 : s0 + steps + 1].float().expand(bsz, -1))
                eidx.append(idx)
                windows.append(s0)
                batch_comps, raw = self._score(ctx, traj.final_latents, pe, pooled, batch_prompts, ids)
                for k, v in batch_comps.items():
                    comps.setdefault(k, []).append(v)
                raws.append(raw)
        finally:
            transformer.train(was_training)
        rollout_s = time.perf_counter() - t0

        local = {k: torch.cat(v) for k, v in comps.items()}
        local_raw = torch.cat(raws)
        local_ids = prompt_group_ids(prompts, device=device)
        world, rank = ctx.num_processes, ctx.process_index
        if world > 1:
            gathered = {k: acc.gather(v.contiguous()) for k, v in local.items()}
            gathered_raw = acc.gather(local_raw.contiguous())
            gathered_ids = acc.gather(local_ids)
        else:
            gathered, gathered_raw, gathered_ids = local, local_raw, local_ids
        res = compute_advantages(
            gathered, gathered_ids, c.weights,
            mode=c.advantage_mode, global_std=c.global_std, adv_clip_max=c.adv_clip_max,
            filter_zero_std=c.filter_zero_std,
        )
        adv = rank_slice(res.advantages, rank, world)
        keep = rank_slice(res.keep, rank, world)
        gen = torch.Generator().manual_seed(stable_hash("grpo-chunks", cfg.seed, self.epoch, rank)) if c.shuffle_chunks else None
        pe_all, pooled_all = store.tensors()
        self.buffer = RolloutBuffer(
            latents=torch.cat(lat),
            log_probs=torch.cat(lps),
            sigmas=torch.cat(sig),
            advantages=adv.float(),
            embed_index=torch.cat(eidx),
            prompt_embeds=pe_all,
            pooled=pooled_all,
            chunks=make_chunks(keep, nb, gen),
        )
        self.last_rollout = {
            "epoch": self.epoch,
            "components": {k: v.detach().cpu() for k, v in local.items()},
            "reward_raw": local_raw.cpu(),
            "group_ids": local_ids.cpu(),
            "advantages": adv.cpu(),
            "keep": keep.cpu(),
            "prompts": list(prompts),
            "windows": windows,
        }
        self.epoch_metrics = self._epoch_stats(gathered, gathered_raw, res, rollout_s, windows)
        self.epoch += 1

    def _epoch_stats(
        self,
        gathered: Mapping[str, torch.Tensor],
        raw: torch.Tensor,
        res: GroupAdvantages,
        rollout_s: float,
        windows: list[int],
    ) -> dict[str, float]:
        """Epoch-level metrics (identical on every process: computed from gathered values)."""
        out: dict[str, float] = {}
        for name, values in sorted(gathered.items()):
            v = values.double()
            out[f"reward_{name}_mean"] = float(v.mean())
            out[f"reward_{name}_std"] = float(v.std(unbiased=False))
        out["reward_raw_mean"] = float(raw.double().mean())
        out["reward_raw_std"] = float(raw.double().std(unbiased=False))
        total = sum(w * gathered[k].double() for k, w in self.config.weights.items())
        assert isinstance(total, torch.Tensor)
        out["reward_weighted_mean"] = float(total.mean())
        n = res.advantages.numel()
        kept = res.keep
        out["zero_std_ratio"] = res.zero_std_ratio
        out["group_size"] = n / max(res.num_groups, 1)
        out["num_groups"] = float(res.num_groups)
        out["kept_fraction"] = float(kept.float().mean())
        out["advantage_abs_mean"] = float(res.advantages[kept].abs().mean()) if bool(kept.any()) else 0.0
        out["samples_per_s"] = n / max(rollout_s, 1e-9)
        out["rollout_time_s"] = rollout_s
        out["window_start"] = float(sum(windows)) / max(len(windows), 1)
        out["rollout_epoch"] = float(self.epoch)
        return out

    # ------------------------------------------------------------------ training
    @contextlib.contextmanager
    def _reference_policy(self, ctx: TrainContext) -> Iterator[torch.nn.Module]:
        """The unwrapped policy with all its adapters disabled (the KL reference); re-enabled on exit."""
        transformer = ctx.transformer
        if not getattr(transformer, "_hf_peft_config_loaded", False):
            raise RuntimeError("the KL reference needs a LoRA policy (no adapter is loaded on the transformer)")
        transformer.disable_adapters()
        try:
            yield transformer
        finally:
            transformer.enable_adapters()

    def _train_chunk(self, ctx: TrainContext, chunk: torch.Tensor) -> dict[str, float]:
        """One micro-step per trained step on the samples ``chunk`` of :attr:`buffer`."""
        from dinalrm_align.algorithms.losses import gaussian_mean_kl, ppo_clip_loss
        from dinalrm_align.sampling.rollout import step_log_prob

        buf = self.buffer
        assert buf is not None
        c = self.config
        idx = chunk.to(buf.latents.device)
        lat, old, sig, adv = buf.latents[idx], buf.log_probs[idx], buf.sigmas[idx], buf.advantages[idx]
        emb = buf.embed_index[idx]
        pe, pooled = buf.prompt_embeds[emb], buf.pooled[emb]
        n = idx.numel()
        guidance = self._guidance(ctx)
        neg_pe, neg_pooled = ctx.negative(n) if guidance > 1.0 else (None, None)
        step_kwargs = dict(
            sde_type=c.sde_type, noise_level=c.level, guidance_scale=guidance,
            negative_prompt_embeds=neg_pe, negative_pooled_prompt_embeds=neg_pooled, detach_uncond=True,
        )
        rows: list[dict[str, float]] = []
        for j in range(self.micro_steps_per_batch):
            x_t, x_next, s, s_next = lat[:, j], lat[:, j + 1], sig[:, j], sig[:, j + 1]
            ref_mean = None
            if c.kl_beta > 0:  # reference first: adapters are toggled before the graded forward
                with torch.no_grad(), self._reference_policy(ctx) as ref_model, ctx.autocast():
                    ref_mean = step_log_prob(ref_model, x_t, x_next, s, s_next, pe, pooled, **step_kwargs).mean
            with ctx.accumulate():
                with ctx.autocast():
                    out = step_log_prob(ctx.model, x_t, x_next, s, s_next, pe, pooled, **step_kwargs)
                policy_loss, info = ppo_clip_loss(out.log_prob, old[:, j], adv, c.clip_range)
                if ref_mean is not None:
                    kl = gaussian_mean_kl(out.mean, ref_mean, out.std).mean()
                    loss = policy_loss + c.kl_beta * kl
                else:
                    kl = torch.zeros((), device=policy_loss.device)
                    loss = policy_loss
                ctx.backward(loss)
            rows.append(
                {
                    "loss": float(loss.detach()),
                    "policy_loss": float(info["policy_loss"]),
                    "kl_loss": float(kl.detach()),
                    "approx_kl": float(info["approx_kl"]),
                    "clipfrac": float(info["clipfrac"]),
                    "clipfrac_gt_one": float(info["clipfrac_gt_one"]),
                    "clipfrac_lt_one": float(info["clipfrac_lt_one"]),
                    "ratio_mean": float(info["ratio_mean"]),
                    "ratio_min": float(info["ratio_min"]),
                    "ratio_max": float(info["ratio_max"]),
                }
            )
        metrics = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k not in ("ratio_min", "ratio_max")}
        metrics["ratio_min"] = min(r["ratio_min"] for r in rows)
        metrics["ratio_max"] = max(r["ratio_max"] for r in rows)
        metrics["chunk_size"] = float(n)
        return metrics

    def train_step(self, ctx: TrainContext, prompts: list[str]) -> dict[str, Any]:
        """Roll out a new epoch if ``prompts`` is non-empty, then train one chunk (``W`` micro-steps)."""
        pending = self.buffer is not None and bool(self.buffer.chunks)
        if prompts:
            if pending:
                raise RuntimeError(
                    "GRPO got new epoch prompts while chunks of the previous epoch are untrained: the prompt "
                    "sampler and the algorithm are out of step"
                )
            self._rollout_epoch(ctx, list(prompts))
        elif not pending:
            raise RuntimeError(
                "GRPO has no rollouts to train on and got no prompts: the trainer must take its prompt stream "
                "from GRPO.build_sampler (a k-repeat sampler that hands out whole epochs)"
            )
        assert self.buffer is not None
        metrics: dict[str, Any] = self._train_chunk(ctx, self.buffer.chunks.pop(0))
        metrics.update(self.epoch_metrics)
        if not self.buffer.chunks:
            self.buffer = None
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "buffer": self.buffer.state_dict() if self.buffer is not None else None,
            "epoch_metrics": dict(self.epoch_metrics),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        buf = state.get("buffer")
        self.buffer = RolloutBuffer.from_state_dict(buf, self._device) if buf is not None else None
        self.epoch_metrics = {k: float(v) for k, v in (state.get("epoch_metrics") or {}).items()}
