"""Build the run's ``accelerate.Accelerator`` (mixed precision, trackers, DeepSpeed, gloo on CPU).

On a machine without a GPU the process group must be created with the gloo backend, otherwise
``accelerate launch --use_deepspeed`` makes every rank believe it is rank 0 of 1. DeepSpeed needs
the micro-batch size, accumulation steps and clipping in its config because the trainer prepares
no dataloader: they are filled in from the recipe here, before ``prepare``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def launched_world_size() -> int:
    """Number of processes announced by the launcher (``WORLD_SIZE``), 1 when launched plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(
    *,
    mixed_precision: str,
    gradient_accumulation_steps: int,
    run_dir: str | os.PathLike,
    log_with: str = "none",
    micro_batch_size: int = 1,
    max_grad_norm: float | None = None,
    find_unused_parameters: bool = False,
    timeout_s: int = 1800,
) -> Accelerator:
    """Create the Accelerator for a run.

    Args:
        mixed_precision: ``no`` | ``fp16`` | ``bf16`` (autocast; trainable weights stay fp32).
        gradient_accumulation_steps: micro-steps per optimizer update (already multiplied by the
            algorithm's micro-steps per batch).
        run_dir: project folder; tracker logs go to ``run_dir/logs``.
        log_with: ``wandb`` | ``tensorboard`` | ``none``.
        micro_batch_size: prompts per process per micro-step (for DeepSpeed's config).
        max_grad_norm: clipping, written into DeepSpeed's config (DeepSpeed clips by itself).
    """
    from dinalrm_align.logs import quiet_environment

    quiet_environment()
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    if launched_world_size() > 1:  # a process-group kwarg in a single plain process breaks accelerate
        backend = None if torch.cuda.is_available() else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=timeout_s)))
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "logs"))
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=None if log_with == "none" else log_with,
        project_config=project,
        kwargs_handlers=handlers,
    )
    if is_deepspeed(accelerator):
        _fill_deepspeed_config(accelerator, micro_batch_size, gradient_accumulation_steps, max_grad_norm)
    return accelerator


def is_deepspeed(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    """DeepSpeed ZeRO stage of the run (0 when DeepSpeed is not used)."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage or 0)


def sharding_of(accelerator: Accelerator) -> str:
    """How the run partitions trainable state: ``none`` (single / DDP), ``zero1``/``zero2``/``zero3``, ``fsdp``."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    stage = zero_stage(accelerator)
    return f"zero{stage}" if stage else "none"


def _planned_zero_stage() -> int:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return 0
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None:
        return int(stage)
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and Path(config_file).is_file():
        import json

        try:
            return int(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage", 0))
        except (ValueError, TypeError):
            return 0
    return 0


def planned_sharding() -> str:
    """The sharding ``accelerate launch`` announced (environment), readable before building the Accelerator."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    stage = _planned_zero_stage()
    return f"zero{stage}" if stage else "none"


def _fill_deepspeed_config(
    accelerator: Accelerator, micro_batch_size: int, accumulation: int, max_grad_norm: float | None
) -> None:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * accelerator.num_processes,
        "gradient_clipping": float(max_grad_norm) if max_grad_norm else 0.0,
    }
    for key, value in wanted.items():
        old = ds.get(key, "auto")
        if old not in ("auto", value):
            logger.warning("DeepSpeed config %s=%s replaced by the recipe's value %s", key, old, value)
        ds[key] = value


@contextlib.contextmanager
def no_zero3_init(accelerator: Accelerator) -> Iterator[None]:
    """Build models unpartitioned under ZeRO-3: frozen encoders and the reward model never go through
    the DeepSpeed engine (only the prepared policy is partitioned, at ``prepare``). accelerate
    registers its ZeRO-3 config with transformers, which would otherwise partition every model built."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def gathered_parameters(sharding: str, params: Iterable[torch.nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Make ZeRO-3 partitioned ``params`` whole inside the context (no-op unless ``sharding == "zero3"``).

    ``sharding``: :func:`sharding_of` the run. With ``modify`` what rank 0 writes is broadcast and
    re-partitioned on exit.
    """
    if sharding == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modify else None):
            yield
    else:
        yield


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (GB) since the last reset; CPU: peak resident set size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover
        return 0.0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
