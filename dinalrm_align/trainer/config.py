"""The alignment recipe (ReFL, GRPO, ...): :class:`TrainConfig` and its policy-specific sections.

Loaded with :func:`dinalrm_align.trainer.recipe.load_recipe` (OmegaConf structured configs: YAML +
``key.sub=value`` overrides, unknown keys and wrong types refused with the valid keys listed).
The ``algorithm`` section is typed by the algorithm's own config class.
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
    "AlgorithmConfig",
    "CheckpointConfig",
    "DataConfig",
    "EMAConfig",
    "EvalConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "ProxyRewardConfig",
    "RewardConfig",
    "SamplingConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainSection",
    "load_train_config",
]


@dataclass
class LoraSettings:
    """Policy LoRA (peft ``LoraConfig``) on the transformer.

    Attributes:
        r, alpha: rank and scale numerator (scale ``alpha / r``); null = the backbone's default
            (32 / 64 for every built-in backbone, as Flow-GRPO and the DiNa-LRM alignment recipes).
        dropout: LoRA dropout.
        init: ``gaussian`` (Flow-GRPO) or ``default`` (peft's Kaiming A, zero B).
        target_modules: module-name suffixes; ``[default]`` = the backbone's attention projections.
        adapter_name: peft adapter name of the policy.
    """

    r: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    init: Literal["gaussian", "default"] = "gaussian"
    target_modules: list[str] = field(default_factory=lambda: ["default"])
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        positive("model.lora.r", self.r)
        positive("model.lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"'model.lora.dropout' must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("'model.lora.target_modules' must name at least one module (or 'default')")


@dataclass
class ModelConfig:
    """The policy.

    Attributes:
        pretrained: a hub id, a local pipeline folder, or a tiny built-in model (``tiny``, ``tiny-flux``,
            ``tiny-zimage``, each with an optional ``:SEED``).
        backbone: ``auto`` (from the pipeline), ``sd3``, ``flux`` or ``zimage``.
        revision, variant: passed to ``from_pretrained``.
        finetune: ``lora`` (only the adapter trains) or ``full`` (every transformer weight).
        lora: the policy LoRA.
        gradient_checkpointing: recompute the policy's activations in the backward pass.
    """

    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"
    backbone: str = "auto"
    revision: str | None = None
    variant: str | None = None
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False


@dataclass
class RewardConfig:
    """The frozen latent reward model and how it is applied.

    Attributes:
        model: hub id, local folder or tiny built-in id (``tiny[:SEED]`` builds a random tiny reward
            model on the policy's own backbone).
        share_base_weights: tie the reward backbone's base weights to the policy transformer's (saves
            their memory; LoRA policies only, refused under sharding).
        dtype: dtype of the reward model (``auto``: the mixed-precision dtype).
        autocast: run the reward under the run's autocast; by default it runs in its own dtype (fp32)
            outside autocast, as the DiNa-LRM alignment recipes do.
        u: target noise level of the reward's re-noising (0.4 for generated latents).
        ensemble: noise levels of the multi-level ensemble (DiNa-LRM*: one shared noise, the levels' tokens
            concatenated, e.g. ``[0.2, 0.5, 0.7]``); replaces ``u`` when set (null: the single level ``u``).
        n_noise: average the reward over this many noise draws (1 with ``ensemble``).
        offset, scale: ``normalize(raw) = (raw + offset) / scale`` (null: the model's own, +10 / 10;
            the DiNa-LRM alignment recipes use +12 / 10).
        gradient_checkpointing: recompute the reward backbone's activations in the backward pass (ReFL).
        bridge: how a reward model of another backbone family scores the policy's latents:
            ``none`` (refused) or ``pixels`` (decode with the policy's VAE, re-encode with the reward
            family's VAE: the slow path).
    """

    model: str = "liuhuohuo/DiNa-LRM-SD35M-12layers"
    share_base_weights: bool = False
    dtype: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    autocast: bool = False
    u: float = 0.4
    ensemble: list[float] | None = None
    n_noise: int = 1
    offset: float | None = None
    scale: float | None = None
    gradient_checkpointing: bool = False
    bridge: Literal["none", "pixels"] = "none"

    def __post_init__(self) -> None:
        if not 0.0 <= self.u <= 1.0:
            raise ValueError(f"'reward.u' must be in [0, 1], got {self.u}")
        positive("reward.n_noise", self.n_noise)
        if self.ensemble is not None:
            if not self.ensemble or not all(0.0 <= u <= 1.0 for u in self.ensemble):
                raise ValueError(f"'reward.ensemble' must be a non-empty list of levels in [0, 1], got {self.ensemble}")
            if self.n_noise != 1:
                raise ValueError("'reward.ensemble' shares one noise draw across its levels: set reward.n_noise to 1")
        if self.scale is not None and self.scale == 0:
            raise ValueError("'reward.scale' must be non-zero")


@dataclass
class SamplingConfig:
    """The flow-matching sampler of training rollouts.

    Attributes:
        resolution: image side in pixels (square images); must fit the backbone (multiple of the VAE
            factor x patch size).
        num_steps: sampling steps of the schedule (the family's own spacing and shift).
        guidance_scale: classifier-free guidance scale, standard convention (``1``: off). Refused on
            guidance-distilled models (FLUX.1-dev) whose guidance is an input (``embedded_guidance``).
        embedded_guidance: the guidance value fed to guidance-distilled models (null: the backbone's
            default, 3.5 for FLUX.1-dev; ignored by models without a guidance input).
        negative_prompt: prompt of the unconditional branch when CFG is on.
        max_sequence_length: text length of the prompt encoder (128: how the reward models were trained).
    """

    resolution: int = 512
    num_steps: int = 40
    guidance_scale: float = 4.5
    embedded_guidance: float | None = None
    negative_prompt: str = ""
    max_sequence_length: int = 128

    def __post_init__(self) -> None:
        positive("sampling.resolution", self.resolution)
        positive("sampling.num_steps", self.num_steps)
        positive("sampling.max_sequence_length", self.max_sequence_length)
        if self.guidance_scale < 0:
            raise ValueError(f"'sampling.guidance_scale' must be >= 0, got {self.guidance_scale}")


@dataclass
class DataConfig:
    """Prompts.

    Attributes:
        prompts: a ``.txt`` (one prompt per line), a ``.jsonl`` (the ``column`` field) or ``hub:NAME``.
        format: ``auto`` (from the name), ``txt``, ``jsonl`` or ``hub``.
        column, split: jsonl / hub column and hub split.
        eval_prompts: separate evaluation prompts (otherwise ``num_eval_prompts`` are held out of ``prompts``).
        eval_split: hub split of ``eval_prompts``.
        num_eval_prompts: evaluation prompts.
        shuffle: shuffle the prompt stream each epoch.
    """

    prompts: str = MISSING
    format: Literal["auto", "txt", "jsonl", "hub"] = "auto"
    column: str = "prompt"
    split: str = "train"
    eval_prompts: str | None = None
    eval_split: str | None = None
    num_eval_prompts: int = 16
    shuffle: bool = True

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("'data.prompts' is empty: give a .txt, .jsonl or hub:NAME prompt source")
        positive("data.num_eval_prompts", self.num_eval_prompts, allow_zero=True)


@dataclass
class ProxyRewardConfig:
    """An extra reward: evaluation-only (``eval.proxy_rewards``) or an extra GRPO component.

    ``target`` is ``pkg.module:callable``, called as ``fn(inputs, prompts, **kwargs)`` with decoded images
    ``(B, 3, H, W)`` in [0, 1] (``inputs: images``) or latents ``(B, C, h, w)`` (``inputs: latents``),
    returning ``B`` scores; with ``factory: true`` it is called once with ``kwargs`` and must return such
    a callable. ``monitor: false`` logs an evaluation proxy without letting it fire ``eval.stop_on_hacking``
    (a golden reward that only measures the outcome).
    """

    name: str = ""
    target: str = ""
    inputs: Literal["images", "latents"] = "images"
    factory: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    monitor: bool = True

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("proxy / extra rewards need a 'target' (pkg.module:callable)")
        if not self.name:
            self.name = self.target.replace(":", ".").rsplit(".", 1)[-1]


@dataclass
class EvalConfig:
    """Deterministic ODE evaluation on held-out prompts (fixed seeds, EMA weights).

    Attributes:
        every: evaluate every this many updates (0: only at start / end).
        at_start, at_end: evaluate before the first and after the last update.
        num_steps, guidance_scale: the evaluation sampler (standard CFG convention).
        batch_size: prompts per forward per process.
        seed: prompt ``i`` starts from the noise of seed ``seed + i``.
        images: decode and save a captioned image grid (and log it with a prompt / reward table).
        grid_columns: grid width.
        proxy_rewards: evaluation-only rewards (e.g. PickScore, a golden reward): logged next to the
            learned reward as ``eval/proxy/<name>`` with the gap ``eval/hacking_gap/<name>``.
        stop_on_hacking: stop training when a proxy falls while the learned reward rises (the reward-
            hacking rule: between two evaluations the learned reward rose by more than ``hacking_margin``
            standard deviations and the proxy fell by more than ``hacking_margin`` of its own).
        hacking_margin: the margin of that rule.
    """

    every: int = 25
    at_start: bool = True
    at_end: bool = True
    num_steps: int = 40
    guidance_scale: float = 4.5
    batch_size: int = 4
    seed: int = 1234
    images: bool = True
    grid_columns: int = 4
    proxy_rewards: list[ProxyRewardConfig] = field(default_factory=list)
    stop_on_hacking: bool = False
    hacking_margin: float = 0.0

    def __post_init__(self) -> None:
        positive("eval.every", self.every, allow_zero=True)
        positive("eval.num_steps", self.num_steps)
        positive("eval.batch_size", self.batch_size)
        positive("eval.grid_columns", self.grid_columns)
        positive("eval.hacking_margin", self.hacking_margin, allow_zero=True)


@dataclass
class TrainConfig(RunConfig):
    """An alignment recipe: the policy, the reward, the sampler, the prompts and the evaluation."""

    #: Paths looked up next to the recipe file when they do not exist from the working directory.
    RELATIVE_PATHS = ("data.prompts", "data.eval_prompts")

    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.reward.share_base_weights and self.model.finetune != "lora":
            raise ValueError(
                "reward.share_base_weights: true needs a LoRA policy (model.finetune: lora); with full "
                "fine-tuning the shared blocks would change under the reward model"
            )


def load_train_config(recipe: Any, overrides: Any = ()) -> Any:
    """An alignment (or any) recipe from YAML / a mapping plus ``key.sub=value`` overrides (``refl`` by default)."""
    from dinalrm_align.trainer.recipe import load_recipe

    return load_recipe(recipe, overrides, default_algorithm="refl")
