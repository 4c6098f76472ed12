"""The Algorithm interface of the one shared trainer.

An algorithm owns what is specific to it: which models it builds and which parameters train, the data
stream, the maths of one update (``train_step``), its evaluation and how its final weights are saved.
The :class:`~dinalrm_align.trainer.loop.Trainer` owns everything else: the accelerator, the optimizer and
LR schedule, gradient accumulation and clipping, the EMA, divergence checks, checkpoints and resume,
tracking, the progress bar and the summary. ReFL, GRPO and reward-model training are all algorithms.

Micro-step contract: the trainer builds the Accelerator with
``gradient_accumulation_steps = train accumulation x algorithm.micro_steps_per_batch`` and calls
:meth:`Algorithm.train_step` once per batch of the data stream. Inside, the algorithm runs exactly
``micro_steps_per_batch`` micro-steps, each as ``with run.accumulate(model): ...; run.backward(loss)``.

Metrics returned by ``train_step`` stay on the device (no host synchronisation in the hot path):
0-d tensors / floats are averaged over batches and processes; 1-D tensors are per-sample values,
gathered and logged as ``<key>_mean`` / ``<key>_std``. ``loss`` is required; keys starting with
``reward`` are checked for non-finite values together with the loss and the gradient norm.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

from dinalrm_align.trainer.sections import AlgorithmConfig, RunConfig

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

__all__ = ["Algorithm", "BuildResult", "DataStream", "EvalResult", "Preflight", "RunState"]


@runtime_checkable
class DataStream(Protocol):
    """What the trainer needs from a data stream (its state is checkpointed with the run)."""

    def next_batch(self) -> Any: ...

    @property
    def epoch_progress(self) -> float: ...  # epochs consumed so far (fractional)

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Preflight:
    """What the cheap checks found (nothing heavy is loaded yet).

    Attributes:
        world_size: processes of the launch.
        accumulation: micro-batches per update.
        summary: one line for ``--check`` (counts of prompts / pairs ...).
        data_fingerprint: hash of the training data (a resume must see the same data).
        info: whatever the algorithm keeps for :meth:`Algorithm.build` (e.g. the prompt lists).
    """

    world_size: int
    accumulation: int
    summary: str
    data_fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunState:
    """What the trainer hands to :meth:`Algorithm.build` and :meth:`Algorithm.setup`.

    Attributes:
        config: the resolved recipe.
        accelerator: the run's accelerator.
        weight_dtype: dtype of frozen weights (the mixed-precision dtype).
        sharding: ``none``, ``zero2``, ``zero3`` or ``fsdp`` (how trainable parameters are partitioned).
        preflight: the preflight result.
        run_dir: the run folder.
    """

    config: RunConfig
    accelerator: Accelerator
    weight_dtype: torch.dtype
    sharding: str
    preflight: Preflight
    run_dir: Path

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def params_sharded(self) -> bool:
        """True when the trainable parameters are partitioned over processes (ZeRO-3, FSDP)."""
        return self.sharding in ("zero3", "fsdp")

    def accumulate(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Context of one micro-step (gradient sync only on the last one of an update)."""
        return self.accelerator.accumulate(model)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision autocast of the run (no-op with ``mixed_precision: no``)."""
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward`` (scales by the accumulation, DeepSpeed-aware)."""
        self.accelerator.backward(loss)


@dataclass
class BuildResult:
    """What :meth:`Algorithm.build` returns.

    Attributes:
        module: the root module holding every trainable parameter (prepared by the trainer).
        params: the trainable parameters (optimizer, EMA, clipping).
        data: the data stream the trainer feeds to ``train_step``.
    """

    module: torch.nn.Module
    params: list[torch.nn.Parameter]
    data: DataStream


@dataclass
class EvalResult:
    """An evaluation: scalar metrics (logged), and optionally an image grid and a per-sample table.

    Attributes:
        metrics: ``{"eval/...": float}`` (complete on the main process).
        grid: path of a captioned image grid, if any.
        table: rows ``{"prompt": str, "image": PIL image | None, "<reward>": float, ...}`` for a tracker table.
        headline: the metrics shown in the console line and the summary (keys of ``metrics``).
        stop: a reason to stop training now (e.g. the reward-hacking rule fired), or None.
    """

    metrics: dict[str, float]
    grid: Path | None = None
    table: list[dict[str, Any]] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)
    stop: str | None = None


class Algorithm(ABC):
    """A training algorithm run by the one trainer (see the module docstring)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    #: The recipe schema this algorithm reads (``TrainConfig`` for alignment, ``RMTrainConfig`` ...).
    recipe_class: ClassVar[type[RunConfig]] = RunConfig
    #: Name of the per-step metric shown in the progress bar next to the loss.
    progress_metric: ClassVar[str] = ""

    def __init__(self, config: AlgorithmConfig) -> None:
        self.config = config

    @property
    def micro_steps_per_batch(self) -> int:
        """Micro-steps one :meth:`train_step` makes (known after :meth:`preflight`)."""
        return 1

    # ------------------------------------------------------------------ before any model
    @abstractmethod
    def preflight(self, recipe: Any, world_size: int) -> Preflight:
        """Cheap checks of the whole recipe and the data (ValueError / FileNotFoundError, one line each)."""

    def check_sharding(self, recipe: Any, sharding: str) -> None:  # noqa: B027 - optional hook
        """Refuse recipe options that cannot work with this kind of parameter sharding."""

    # ------------------------------------------------------------------ models
    @abstractmethod
    def build(self, run: RunState) -> BuildResult:
        """Load models, choose the trainable parameters, make the data stream (before ``prepare``)."""

    @abstractmethod
    def setup(self, run: RunState, model: torch.nn.Module) -> None:
        """Called once after ``accelerator.prepare``; ``model`` is the prepared :attr:`BuildResult.module`."""

    @abstractmethod
    def train_step(self, batch: Any) -> dict[str, Any]:
        """Run ``micro_steps_per_batch`` micro-steps on this process' ``batch``; return device metrics."""

    # ------------------------------------------------------------------ evaluation and outputs
    def evaluate(self, step: int) -> EvalResult | None:
        """Evaluate the current (EMA-swapped) weights; every process calls it (collectives allowed)."""
        return None

    @abstractmethod
    def save_final(self, out_dir: Path, trainable_state: dict[str, torch.Tensor]) -> str:
        """Write the final weights (main process); ``trainable_state`` are the gathered trainable weights.
        Returns a short description of the format."""

    def model_card(self, summary: dict[str, Any]) -> str | None:
        """Markdown model card of the final weights (None: none)."""
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Per-process algorithm state for checkpoints (tensors and plain Python types only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned."""
