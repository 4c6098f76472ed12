"""Recipe sections shared by every algorithm: optimizer, batching, EMA, checkpoints, tracking.

Every field is documented where it is declared (the docs page lists the same text). Each recipe
(alignment with :class:`~dinalrm_align.trainer.config.TrainConfig`, reward-model training with
:class:`~dinalrm_align.rm_training.config.RMTrainConfig`) derives from :class:`RunConfig`.
Checks that look at one section live in its ``__post_init__``; checks across sections live in the
recipe class or the algorithm's ``validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "EMAConfig",
    "OptimConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainSection",
    "positive",
]


def positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    """ValueError unless ``value`` is None, > 0 (or >= 0 with ``allow_zero``)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"'{name}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule.

    Attributes:
        lr: peak learning rate.
        betas, weight_decay, eps: AdamW settings.
        max_grad_norm: clip the global gradient norm to this (null: no clipping).
        lr_scheduler: diffusers' ``get_scheduler`` name.
        warmup_steps: linear warm-up steps (``constant_with_warmup``, ``linear``, ``cosine``).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        positive("optim.lr", self.lr)
        positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        positive("optim.max_grad_norm", self.max_grad_norm)
        positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"'optim.betas' must lie in [0, 1), got {list(self.betas)}")


@dataclass
class TrainSection:
    """Batching, precision and the run length. One *step* is one optimizer update.

    Attributes:
        max_steps: optimizer updates of the run.
        batch_size: samples (prompts, or preference pairs) per process per micro-step.
        gradient_accumulation_steps: micro-batches per update (ignored when ``global_batch_size`` is set).
        global_batch_size: samples per update over all processes; must be divisible by
            ``batch_size x processes`` and then fixes the accumulation.
        mixed_precision: autocast dtype; trainable weights always stay fp32.
        allow_tf32: TF32 matmuls on NVIDIA GPUs.
        num_threads: ``torch.set_num_threads`` (CPU runs; tiny models are fastest with 1 thread).
        log_every: log (and check for divergence) every this many updates; metrics are only moved
            to the host at these steps.
        max_retries: on a non-finite loss / gradient, skip the update and retry with the next batch up
            to this many times in a row before stopping (0: stop at the first one). Needs a host
            synchronisation per update when > 0.
    """

    max_steps: int = 150
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    allow_tf32: bool = True
    num_threads: int | None = None
    log_every: int = 1
    max_retries: int = 0

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "global_batch_size",
                    "num_threads", "log_every"):
            positive(f"train.{key}", getattr(self, key))
        positive("train.max_retries", self.max_retries, allow_zero=True)

    def accumulation_for(self, num_processes: int) -> int:
        """Micro-batches per update for ``num_processes``; ValueError if the global batch does not divide."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_micro = self.batch_size * num_processes
        if self.global_batch_size % per_micro != 0:
            raise ValueError(
                f"train.global_batch_size {self.global_batch_size} is not divisible across processes: "
                f"batch_size {self.batch_size} x {num_processes} processes = {per_micro} samples per micro-step"
            )
        return self.global_batch_size // per_micro


@dataclass
class EMAConfig:
    """EMA of the trainable weights (diffusers' ``EMAModel``), used for evaluation and the saved weights.

    With ``warmup`` the decay at update ``t`` is ``1 - (1 + t / inv_gamma) ** -power``, capped at
    ``decay``: early updates forget the initial weights fast (after 150 updates with the defaults the
    initial weights keep a weight below 1e-5) and the averaging horizon ``1 / (1 - decay_t)`` grows to
    ``1 / (1 - decay)`` (about ``(1 + t) ** power`` updates before the cap: 28 at update 150).

    Attributes:
        enabled: keep an EMA.
        decay: maximum decay.
        warmup: use the warm-up schedule above (otherwise ``(1 + t) / (10 + t)``, capped at ``decay``).
        inv_gamma, power: warm-up shape.
        min_decay: lower cap of the decay.
        update_after_step: updates before the EMA starts following the weights.
        update_every: update the EMA every this many optimizer steps.
        foreach: fused multi-tensor update.
    """

    enabled: bool = True
    decay: float = 0.99
    warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0
    update_after_step: int = 0
    update_every: int = 1
    foreach: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_decay <= self.decay < 1.0:
            raise ValueError(f"need 0 <= ema.min_decay <= ema.decay < 1, got {self.min_decay}, {self.decay}")
        positive("ema.inv_gamma", self.inv_gamma)
        positive("ema.power", self.power)
        positive("ema.update_every", self.update_every)
        positive("ema.update_after_step", self.update_after_step, allow_zero=True)


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (``accelerator.save_state`` into ``run_dir/checkpoints/step_XXXXXX``).

    Attributes:
        every: save every this many updates (0: never; the final weights are always saved).
        keep_last: complete checkpoints to keep; older ones are removed only after a newer one is complete.
        resume: ``latest`` or a checkpoint folder (null: start fresh).
        allow_recipe_change: resume even when the recipe or the data set differs from the checkpoint's
            (a deliberate change); otherwise a mismatch is refused.
    """

    every: int = 50
    keep_last: int = 3
    resume: str | None = None
    allow_recipe_change: bool = False

    def __post_init__(self) -> None:
        positive("checkpoint.every", self.every, allow_zero=True)
        positive("checkpoint.keep_last", self.keep_last)


@dataclass
class TrackingConfig:
    """Experiment tracking through accelerate (every scalar row also goes to ``run_dir/metrics.jsonl``).

    Attributes:
        log_with: ``wandb``, ``tensorboard`` or ``none``.
        project: tracker project (tensorboard: folder name unless ``run_name``).
        run_name, tags, entity: wandb run settings.
        mode: wandb mode (``offline`` writes ``run_dir/wandb/offline-run-*``).
    """

    log_with: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "dinalrm-align"
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None
    entity: str | None = None


@dataclass
class AlgorithmConfig:
    """Base of every algorithm's config section; ``name`` selects the algorithm.

    Attributes:
        name: ``refl``, ``grpo``, ``reward_model`` or a ``pkg.module:Class`` algorithm.
    """

    name: str = ""


@dataclass
class RunConfig:
    """What every recipe has: the run folder, the seed, the algorithm and the shared sections.

    Attributes:
        run_dir: output folder (config, metrics, evaluation grids, checkpoints, final weights).
        seed: seeds initialisation, prompt order and noise (each process adds its own offset).
    """

    run_dir: str = "runs/default"
    seed: int = 0
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    #: Keys that may change between a checkpoint and its resumption without changing the training
    #: trajectory (excluded from the recipe fingerprint). Dotted prefixes.
    RESUMABLE_CHANGES = ("run_dir", "checkpoint", "tracking", "train.max_steps", "train.log_every",
                         "train.num_threads", "eval")
