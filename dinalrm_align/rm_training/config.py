"""The reward-model training recipe (``dinalrm-align train-rm RECIPE.yaml`` = ``train`` with
``algorithm: reward_model``): :class:`RMTrainConfig` and its sections, with the released DiNa-LRM defaults
(lr 5e-5 constant, weight decay 0.01, clipping 1.0, 4 pairs per GPU, uniform u, noise-calibrated Thurstone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import MISSING

from dinalrm_align.trainer.sections import (
    AlgorithmConfig,
    CheckpointConfig,
    EMAConfig,
    OptimConfig,
    RunConfig,
    TrackingConfig,
    TrainSection,
    positive,
)

__all__ = [
    "LossConfig", "RMAlgorithmConfig", "RMDataConfig", "RMEvalConfig", "RMModelConfig", "RMTrainConfig",
    "load_rm_train_config",
]  # fmt: skip


@dataclass
class RMModelConfig:
    """The base pipeline (text stack, base transformer) and the reward model to train.

    Attributes:
        pipeline: tiny id (``tiny``, ``tiny-flux``, ``tiny-zimage``, ``:SEED``), local folder or hub id.
        backbone: ``auto`` (the pipeline's family) or ``sd3`` / ``flux`` / ``zimage`` (must match).
        revision, variant: passed to ``from_pretrained``.
        preset: ``default`` (the family's upstream reward model: SD3.5 12 blocks / FLUX 19 / Z-Image 16 ...;
            ``sd35m`` is the same) or ``tiny`` (the tiny test architecture of the family).
        architecture: model-section keys that override the preset (e.g. ``num_transformer_layers``).
        init_from: a saved reward model to fine-tune instead of a fresh one.
        train_lora, train_head: what trains.
        max_sequence_length: text length of the prompt encoder (128 for parity with the released model).
        zero_init_noise: std of a small random init of the zero-initialised trainable layers (FiLM outputs,
            value gates, LoRA B) of a fresh model; 0 keeps the reference zero init.
        gradient_checkpointing: recompute the backbone's activations in the backward pass.
    """

    pipeline: str = "stabilityai/stable-diffusion-3.5-medium"
    backbone: str = "auto"
    revision: str | None = None
    variant: str | None = None
    preset: Literal["default", "sd35m", "tiny"] = "default"
    architecture: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    train_lora: bool = True
    train_head: bool = True
    max_sequence_length: int = 128
    zero_init_noise: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        positive("model.zero_init_noise", self.zero_init_noise, allow_zero=True)
        positive("model.max_sequence_length", self.max_sequence_length)
        if not (self.train_lora or self.train_head):
            raise ValueError("model.train_lora and model.train_head are both false: nothing would train")


@dataclass
class RMDataConfig:
    """Latent pair shards (written by ``dinalrm-align preprocess`` with the same backbone's VAE).

    Attributes:
        train: a folder (or .parquet file) of training pair shards.
        eval: separate evaluation shards; without them ``num_eval`` pairs are held out of ``train``.
        num_eval: held-out pairs when ``eval`` is not given.
        min_votes: keep only pairs whose chosen image got at least that many votes.
        shuffle: shuffle the bucketed batches each epoch.
        text_cache: prompt embeddings kept in memory (0 disables the cache).
        synthetic_pairs: when > 0 and ``train`` does not exist, first write this many synthetic
            colour-preference pairs there (and a quarter as many into ``eval`` when it is given and
            missing), encoded with ``model.pipeline``'s VAE: lets the tiny recipes run standalone.
    """

    train: str = MISSING
    eval: str | None = None
    num_eval: int = 1000
    min_votes: int | None = None
    shuffle: bool = True
    text_cache: int = 4096
    synthetic_pairs: int = 0

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("'data.train' is empty: give a folder of latent pair shards")
        positive("data.num_eval", self.num_eval, allow_zero=True)
        positive("data.text_cache", self.text_cache, allow_zero=True)
        positive("data.synthetic_pairs", self.synthetic_pairs, allow_zero=True)


@dataclass
class LossConfig:
    """Preference loss and noise-level sampling (one u per pair, mapped to the nearest table sigma).

    Attributes:
        name: ``thurstone`` (noise-calibrated: per-image variance ``variance_scale * sigma^2 +
            variance_floor``, fidelity loss), ``thurstone-constant`` (fixed variance ``constant_variance``)
            or ``bt`` (Bradley-Terry).
        u_sampler: ``uniform`` in [u_min, u_max] or ``logit_normal`` (``logit_mean``, ``logit_std``).
        logit_mean, logit_std: ``u = sigmoid(N(logit_mean, logit_std))`` for ``logit_normal``.
        u_min, u_max: range of ``uniform``.
        variance_scale, variance_floor: per-image variance ``variance_scale * sigma^2 + variance_floor``
            of ``thurstone`` (noisier latents are less certain).
        constant_variance: the fixed per-image variance of ``thurstone-constant``.
    """

    name: Literal["thurstone", "thurstone-constant", "bt"] = "thurstone"
    u_sampler: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    u_min: float = 0.0
    u_max: float = 1.0
    variance_scale: float = 2.0
    variance_floor: float = 0.05
    constant_variance: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.u_min < self.u_max <= 1.0:
            raise ValueError(f"need 0 <= loss.u_min < loss.u_max <= 1, got {self.u_min}, {self.u_max}")
        if self.variance_scale < 0 or self.variance_floor <= 0 or self.constant_variance <= 0:
            raise ValueError("loss variances must be positive (loss.variance_scale may be 0)")


@dataclass
class RMEvalConfig:
    """Pairwise accuracy on the evaluation pairs (EMA weights, fixed seeds, ties count as wrong).

    Attributes:
        every, at_start, at_end: when to evaluate.
        us: single noise levels to report accuracy at.
        ensemble: noise levels of the token-concatenation ensemble (DiNa-LRM*; null: none).
        num_pairs: evaluate at most this many pairs (null: all).
        seed, n_noise, batch_size: scoring settings.
    """

    every: int = 1000
    at_start: bool = True
    at_end: bool = True
    us: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5])
    ensemble: list[float] | None = None
    num_pairs: int | None = None
    seed: int = 1234
    n_noise: int = 1
    batch_size: int = 16

    def __post_init__(self) -> None:
        positive("eval.every", self.every, allow_zero=True)
        positive("eval.batch_size", self.batch_size)
        positive("eval.n_noise", self.n_noise)
        for u in list(self.us) + list(self.ensemble or []):
            if not 0.0 <= u <= 1.0:
                raise ValueError(f"eval noise levels must lie in [0, 1], got {u}")


# The shared sections with the released reward-model defaults (subclasses, so a partially given section
# keeps these defaults for the keys it omits).
@dataclass
class RMOptimConfig(OptimConfig):
    lr: float = 5e-5
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0


@dataclass
class RMTrainSection(TrainSection):
    max_steps: int = 25_000
    batch_size: int = 4
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    log_every: int = 10


@dataclass
class RMEMAConfig(EMAConfig):
    decay: float = 0.995


@dataclass
class RMCheckpointConfig(CheckpointConfig):
    every: int = 2000


@dataclass
class RMTrackingConfig(TrackingConfig):
    project: str = "dinalrm-rm"


@dataclass
class RMAlgorithmConfig(AlgorithmConfig):
    """``algorithm`` section of reward-model training (its settings live in ``model`` / ``loss`` / ``data``)."""

    name: str = "reward_model"


@dataclass
class RMTrainConfig(RunConfig):
    """A reward-model training recipe."""

    run_dir: str = "runs/reward_model"
    algorithm: AlgorithmConfig = field(default_factory=RMAlgorithmConfig)
    model: RMModelConfig = field(default_factory=RMModelConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=RMOptimConfig)
    train: TrainSection = field(default_factory=RMTrainSection)
    ema: EMAConfig = field(default_factory=RMEMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=RMCheckpointConfig)
    eval: RMEvalConfig = field(default_factory=RMEvalConfig)
    tracking: TrackingConfig = field(default_factory=RMTrackingConfig)

    #: Paths looked up next to the recipe file when they do not exist from the working directory.
    RELATIVE_PATHS = ("data.train", "data.eval")


def load_rm_train_config(recipe: Any, overrides: Any = ()) -> Any:
    """A reward-model recipe from YAML / a mapping plus overrides (``algorithm: reward_model`` by default)."""
    from dinalrm_align.trainer.recipe import load_recipe

    return load_recipe(recipe, overrides, default_algorithm="reward_model")
