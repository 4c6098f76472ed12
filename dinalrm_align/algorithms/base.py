"""The Algorithm interface plugged into the shared trainer, the context it receives, and the registry.

An algorithm owns the maths of one update (rollouts, rewards, loss, ``ctx.backward``); the trainer
owns everything else (accelerator, optimizer step, clipping, EMA, checkpoints, eval, logging).

Micro-step contract: the trainer builds the Accelerator with
``gradient_accumulation_steps = train.gradient_accumulation_steps * algorithm.micro_steps_per_batch``
and calls :meth:`Algorithm.train_step` once per prompt batch. Inside, the algorithm runs exactly
``micro_steps_per_batch`` micro-steps, each as ``with ctx.accumulate(): ...; ctx.backward(loss)``.
After ``train.gradient_accumulation_steps`` batches the trainer clips, steps the optimizer and the
LR scheduler, and zeroes the gradients.

Metrics returned by ``train_step``: floats / 0-d tensors are averaged over batches and processes;
1-D tensors are per-sample values, gathered over processes and logged as ``<key>_mean`` / ``<key>_std``.
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from dinalrm_align.trainer.config import AlgorithmConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from accelerate import Accelerator
    from diffusers import StableDiffusion3Pipeline

    from dinalrm_align.reward_model.model import LatentRewardModel
    from dinalrm_align.trainer.config import TrainConfig


@runtime_checkable
class PromptSource(Protocol):
    """What the trainer needs from a prompt stream (checkpointed with the run)."""

    prompts: list[str]

    @property
    def position(self) -> int: ...  # prompts drawn so far (position / len(prompts) = epochs)

    def next_batch(self) -> list[str]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainContext:
    """Everything an algorithm may use during setup and a train step.

    Attributes:
        config: the resolved recipe.
        accelerator: the run's ``accelerate.Accelerator``.
        pipeline: the SD3 pipeline (text encoders, VAE, scheduler config; frozen).
        model: the prepared policy transformer (DDP / DeepSpeed wrapped): use it for forwards WITH grad.
        transformer: the same transformer unwrapped: use it for no-grad rollouts.
        reward_model: the frozen latent reward model.
        weight_dtype: dtype of frozen weights (mixed-precision dtype).
        latent_shape: ``(C, h, w)`` of the policy latents at ``sampling.resolution``.
    """

    config: TrainConfig
    accelerator: Accelerator
    pipeline: StableDiffusion3Pipeline
    model: torch.nn.Module
    transformer: torch.nn.Module
    reward_model: LatentRewardModel
    weight_dtype: torch.dtype
    latent_shape: tuple[int, int, int]
    _negative_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts without grad -> ``(B, 77 + L, D)``, ``(B, P)`` on ``device`` (fp32)."""
        import torch

        from dinalrm_align.reward_model.text import encode_prompts

        with torch.no_grad():
            pe, pooled = encode_prompts(
                self.pipeline, list(prompts), max_sequence_length=self.config.sampling.max_sequence_length
            )
        return pe.to(self.device, torch.float32), pooled.to(self.device, torch.float32)

    def negative(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of ``sampling.negative_prompt`` tiled to ``batch_size`` (cached)."""
        text = self.config.sampling.negative_prompt
        if text not in self._negative_cache:
            self._negative_cache[text] = self.encode([text])
        pe, pooled = self._negative_cache[text]
        return pe.expand(batch_size, -1, -1), pooled.expand(batch_size, -1)

    def normalize_reward(self, raw: torch.Tensor) -> torch.Tensor:
        """``(raw + offset) / scale``: ``reward.offset`` / ``reward.scale`` if set, else the model's own."""
        cfg = self.config.reward
        if cfg.offset is None and cfg.scale is None:
            return self.reward_model.normalize(raw)
        norm = self.reward_model.normalization
        offset = norm.offset if cfg.offset is None else cfg.offset
        scale = norm.scale if cfg.scale is None else cfg.scale
        return (raw + offset) / scale

    def accumulate(self) -> contextlib.AbstractContextManager:
        """Context of one micro-step (gradient sync only on the last one of an update)."""
        return self.accelerator.accumulate(self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision autocast of the run (no-op with ``mixed_precision: no``)."""
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward`` (scales by the accumulation steps, DeepSpeed-aware)."""
        self.accelerator.backward(loss)


class Algorithm(ABC):
    """An alignment algorithm run by :class:`dinalrm_align.trainer.loop.Trainer`.

    Subclasses set ``name`` and ``config_class`` (a dataclass derived from
    :class:`~dinalrm_align.trainer.config.AlgorithmConfig`, loaded from the recipe's
    ``algorithm`` section) and implement :meth:`setup` and :meth:`train_step`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig

    def __init__(self, config: AlgorithmConfig) -> None:
        self.config = config

    @property
    def micro_steps_per_batch(self) -> int:
        """Number of ``ctx.accumulate()`` micro-steps one :meth:`train_step` call makes."""
        return 1

    def validate(self, config: TrainConfig) -> None:  # noqa: B027 - optional hook
        """Cheap consistency checks against the whole recipe, before any model is loaded."""

    def build_sampler(
        self,
        prompts: Sequence[str],
        *,
        batch_size: int,
        num_processes: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
    ) -> PromptSource:
        """The prompt stream the trainer feeds to :meth:`train_step` (one ``next_batch()`` per call).

        Default: :class:`~dinalrm_align.trainer.data.PromptSampler` (distinct ``batch_size`` prompts
        per process per call). Override for grouped sampling (GRPO's k-repeat sampler).
        """
        from dinalrm_align.trainer.data import PromptSampler

        return PromptSampler(
            prompts, batch_size, num_processes=num_processes, rank=rank, seed=seed, shuffle=shuffle
        )

    @abstractmethod
    def setup(self, ctx: TrainContext) -> None:
        """Called once after models, optimizer and accelerator are ready (before resuming)."""

    @abstractmethod
    def train_step(self, ctx: TrainContext, prompts: list[str]) -> dict[str, Any]:
        """Run ``micro_steps_per_batch`` micro-steps on this process' ``prompts``; return metrics."""

    def state_dict(self) -> dict[str, Any]:
        """Per-process algorithm state for checkpoints (tensors and plain Python types only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned."""


#: Built-in algorithms: name -> "module:Class" (imported on demand).
ALGORITHMS: dict[str, str] = {
    "refl": "dinalrm_align.algorithms.refl:ReFL",
    "grpo": "dinalrm_align.algorithms.grpo:GRPO",
}


def register_algorithm(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:Class"`` so recipes can say ``algorithm: {name: NAME}``."""
    if ":" not in target:
        raise ValueError(f"algorithm target {target!r} must look like 'package.module:Class'")
    ALGORITHMS[name] = target


def import_object(target: str) -> Any:
    """Import ``"pkg.module:attr"`` or ``"pkg.module.attr"``; ValueError with the target if it fails."""
    if ":" in target:
        module_name, attr = target.split(":", 1)
    elif "." in target:
        module_name, attr = target.rsplit(".", 1)
    else:
        raise ValueError(f"{target!r} is not an import path (expected 'package.module:name')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for {target!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (from {target!r})")
        obj = getattr(obj, part)
    return obj


def resolve_algorithm(name: str) -> type[Algorithm]:
    """Algorithm class for a registered name or an import path ``pkg.module:Class``."""
    target = ALGORITHMS.get(name)
    if target is None and (":" in name or "." in name):
        target = name
    if target is None:
        raise ValueError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(ALGORITHMS)}")
    cls = import_object(target)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ValueError(f"{target!r} is not a subclass of dinalrm_align.algorithms.base.Algorithm")
    return cls

