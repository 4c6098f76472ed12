"""Typed recipe of reward-model training (``dinalrm-align train-rm RECIPE.yaml``).

Reuses the shared trainer's generic loader (:func:`dinalrm_align.trainer.config.load_dataclass`:
type checks, unknown keys listed with the valid ones, ``--set a.b=c`` overrides) and its
``optim`` / ``train`` / ``ema`` / ``checkpoint`` / ``tracking`` sections, with defaults from the
released DiNa-LRM recipe (dina_lrm.md 4.4).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dinalrm_align.trainer.config import (
    CheckpointConfig,
    EMAConfig,
    OptimConfig,
    TrackingConfig,
    TrainSection,
    apply_overrides,
    load_dataclass,
    read_yaml,
)


@dataclass
class RMModelConfig:
    """The SD3 pipeline (text stack + base transformer) and the reward model to train.

    ``pipeline``: ``tiny`` / ``tiny:SEED``, a local folder or a hub id. The reward model is built
    fresh from ``preset`` (``sd35m``: the released 12-layer architecture; ``tiny``: the tiny test
    architecture) with ``architecture`` overriding keys of its model section, or loaded from
    ``init_from`` (a saved reward model, to fine-tune).
    """

    pipeline: str = "stabilityai/stable-diffusion-3.5-medium"
    revision: str | None = None
    variant: str | None = None
    preset: Literal["sd35m", "tiny"] = "sd35m"
    architecture: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    train_lora: bool = True
    train_head: bool = True
    max_sequence_length: int = 128
    #: Std of a small random init of the zero-initialised trainable layers (FiLM outputs, value
    #: gates, LoRA B) of a fresh model; 0 keeps the reference zero init. Breaks the symmetry of
    #: text-conditional readouts faster on tiny models.
    zero_init_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.zero_init_noise < 0:
            raise ValueError(f"'model.zero_init_noise' must be >= 0, got {self.zero_init_noise}")
        if self.max_sequence_length < 1:
            raise ValueError(f"'model.max_sequence_length' must be >= 1, got {self.max_sequence_length}")
        if not (self.train_lora or self.train_head):
            raise ValueError("model.train_lora and model.train_head are both false: nothing would train")


@dataclass
class RMDataConfig:
    """Latent pair shards (see :mod:`dinalrm_align.rm_training.data`).

    ``eval``: separate shards for evaluation; without them ``num_eval`` pairs are held out of
    ``train`` by a seeded split. ``min_votes`` keeps only pairs whose chosen image got at least that
    many votes. ``text_cache``: prompt embeddings kept in memory (0 disables the cache).
    """

    train: str = ""
    eval: str | None = None
    num_eval: int = 1000
    min_votes: int | None = None
    shuffle: bool = True
    text_cache: int = 4096

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("missing required key 'data.train' (a folder of latent pair shards)")
        if self.num_eval < 0 or self.text_cache < 0:
            raise ValueError("'data.num_eval' and 'data.text_cache' must be >= 0")


@dataclass
class LossConfig:
    """Preference loss and noise-level sampling (one u per pair, mapped to the nearest table sigma)."""

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
            raise ValueError("loss variances must be positive (variance_scale may be 0)")


@dataclass
class RMEvalConfig:
    """Pairwise accuracy on the eval pairs every ``every`` steps (EMA weights, fixed seeds)."""

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
        if self.every < 0 or self.batch_size < 1 or self.n_noise < 1:
            raise ValueError("eval.every must be >= 0; eval.batch_size and eval.n_noise >= 1")
        for u in list(self.us) + list(self.ensemble or []):
            if not 0.0 <= u <= 1.0:
                raise ValueError(f"eval noise levels must lie in [0, 1], got {u}")


# The shared sections with the released reward-model defaults. Subclasses (not default_factory
# values) so that a partially given section keeps these defaults for the keys it omits.
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
    enabled: bool = True
    decay: float = 0.995
    update_every: int = 1


@dataclass
class RMCheckpointConfig(CheckpointConfig):
    every: int = 2000
    keep_last: int = 3


@dataclass
class RMTrackingConfig(TrackingConfig):
    project: str = "dinalrm-rm"


@dataclass
class RMTrainConfig:
    """A whole reward-model training recipe."""

    run_dir: str = "runs/reward_model"
    seed: int = 0
    model: RMModelConfig = field(default_factory=RMModelConfig)
    data: RMDataConfig = field(kw_only=True)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: RMOptimConfig = field(default_factory=RMOptimConfig)
    train: RMTrainSection = field(default_factory=RMTrainSection)
    ema: RMEMAConfig = field(default_factory=RMEMAConfig)
    checkpoint: RMCheckpointConfig = field(default_factory=RMCheckpointConfig)
    eval: RMEvalConfig = field(default_factory=RMEvalConfig)
    tracking: RMTrackingConfig = field(default_factory=RMTrackingConfig)


def load_rm_train_config(
    recipe: str | os.PathLike | Mapping[str, Any], overrides: Iterable[str] = ()
) -> RMTrainConfig:
    """Load an :class:`RMTrainConfig` from YAML (or a mapping) plus ``key.sub=value`` overrides.

    Relative ``data.train`` / ``data.eval`` paths that do not exist from the working directory are
    looked up next to the recipe file.
    """
    base_dir: Path | None = None
    if isinstance(recipe, Mapping):
        raw = dict(recipe)
    else:
        raw = read_yaml(recipe)
        base_dir = Path(recipe).resolve().parent
    raw = apply_overrides(raw, overrides)
    if base_dir is not None and isinstance(raw.get("data"), dict):
        data = dict(raw["data"])
        for key in ("train", "eval"):
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                if not Path(value).exists() and (base_dir / value).exists():
                    data[key] = str(base_dir / value)
        raw["data"] = data
    return load_dataclass(RMTrainConfig, raw, section="root")
