"""Atomic, resumable training checkpoints.

Layout of ``run_dir/checkpoints/step_000010/``::

    checkpoint.json          marker written last: step, num_processes, file list, meta
    weights.safetensors      trainable weights (name -> tensor), written by the main process
    <name>.pt                shared state (optimizer, lr_scheduler, ema, data, ...), main process
    <name>_rank00001.pt      per-process state (RNG states, algorithm state, sharded optimizer)

Every ``.pt`` file holds tensors and plain Python types only and loads with
``torch.load(weights_only=True)``. A checkpoint is written into ``.tmp_step_000010`` and renamed
when complete, so an interrupted save never looks like a checkpoint; older ones beyond
``keep_last`` are deleted afterwards. All processes must call :meth:`CheckpointManager.save` and
:meth:`CheckpointManager.load` (they synchronise with barriers); the run folder must be on a file
system every process sees.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "checkpoint.json"
WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------
# RNG state as tensors / plain types (weights_only-safe)
# ----------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states of this process, as tensors and plain types."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``checkpoint_dir``, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and is_checkpoint(p)]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str | None, run_dir: str | os.PathLike) -> Path | None:
    """``None`` -> no resume; ``latest`` -> newest checkpoint of ``run_dir`` (None if there is none);
    a path -> that checkpoint (ValueError if it is not one, FileNotFoundError if it does not exist)."""
    if spec is None or spec == "":
        return None
    if spec == "latest":
        found = list_checkpoints(Path(run_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    if not is_checkpoint(path):
        inner = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        hint = f" (it contains checkpoints; did you mean {inner[-1]}?)" if inner else ""
        raise ValueError(f"{path} is not a checkpoint folder: it has no {MARKER}{hint}")
    return path


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


# ----------------------------------------------------------------------------------------------
# The manager
# ----------------------------------------------------------------------------------------------


def _barrier(accelerator: Any) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


class CheckpointManager:
    """Writes and reads checkpoints under ``run_dir/checkpoints``.

    Args:
        run_dir: the run folder.
        keep_last: how many complete checkpoints to keep (older ones are deleted after a save).
        accelerator: for rank / world size / barriers (``None``: single process).
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, accelerator: Any = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.accelerator = accelerator

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def latest(self) -> Path | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    def save(
        self,
        step: int,
        *,
        weights: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]],
        shared: dict[str, Any] | None = None,
        per_rank: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically; every process must call it.

        Args:
            weights: trainable weights (or a callable producing them; called on every process,
                so it may gather ZeRO-3 partitions), saved by the main process as safetensors.
            shared: name -> state identical on all processes (saved once, by the main process).
            per_rank: name -> state of this process (saved by every process).
            meta: JSON-serialisable extra information (kept in ``checkpoint.json``).
        """
        final = self.root / step_dirname(step)
        tmp = self.root / f".tmp_{step_dirname(step)}"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier(self.accelerator)
        tensors = weights() if callable(weights) else weights
        if self.is_main:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
            for name, state in (shared or {}).items():
                torch.save(state, tmp / f"{name}.pt")
        for name, state in (per_rank or {}).items():
            torch.save(state, tmp / f"{name}_rank{self.rank:05d}.pt")
        _barrier(self.accelerator)
        if self.is_main:
            marker = {
                "format_version": FORMAT_VERSION,
                "step": int(step),
                "num_processes": self.world_size,
                "shared": sorted(shared or {}),
                "per_rank": sorted(per_rank or {}),
                "time": time.time(),
                "meta": meta or {},
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate()
        _barrier(self.accelerator)
        return final

    def _rotate(self) -> None:
        found = list_checkpoints(self.root)
        for old in found[: max(0, len(found) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Read a checkpoint for this process.

        Returns:
            ``{"step", "meta", "weights": {name: tensor}, "shared": {...}, "per_rank": {...}}``.

        Raises:
            ValueError: not a checkpoint, or written by a different number of processes.
        """
        from safetensors.torch import load_file

        path = Path(path)
        if not is_checkpoint(path):
            raise ValueError(f"{path} is not a checkpoint folder: it has no {MARKER}")
        marker = read_marker(path)
        if int(marker["num_processes"]) != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {marker['num_processes']} processes; this run has "
                f"{self.world_size}. Resume with the same number of processes."
            )
        shared = {name: torch.load(path / f"{name}.pt", weights_only=True) for name in marker["shared"]}
        per_rank = {
            name: torch.load(path / f"{name}_rank{self.rank:05d}.pt", weights_only=True)
            for name in marker["per_rank"]
        }
        return {
            "step": int(marker["step"]),
            "meta": marker.get("meta", {}),
            "weights": load_file(str(path / WEIGHTS)),
            "shared": shared,
            "per_rank": per_rank,
        }


# ----------------------------------------------------------------------------------------------
# Optimizer state (plain torch or DeepSpeed ZeRO), weights_only-safe
# ----------------------------------------------------------------------------------------------


def _zero_optimizer(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO optimizer behind an accelerate wrapper, or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    name = type(inner).__name__
    return inner if name.startswith("DeepSpeedZeroOptimizer") else None


def optimizer_is_sharded(optimizer: Any) -> bool:
    """True when each process holds a different part of the optimizer state (DeepSpeed ZeRO)."""
    return _zero_optimizer(optimizer) is not None


def optimizer_state(optimizer: Any) -> dict[str, Any]:
    """Optimizer state as tensors / plain types.

    Plain torch optimizers: their ``state_dict()``. DeepSpeed ZeRO: this rank's fp32 master
    partitions and the state of the wrapped torch optimizer (per process).
    """
    zero = _zero_optimizer(optimizer)
    if zero is None:
        return getattr(optimizer, "optimizer", optimizer).state_dict()
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return {
            "zero": 2,
            "base": zero.optimizer.state_dict(),
            "fp32": [t.detach().cpu().clone() for t in zero.single_partition_of_fp32_groups],
        }
    zero._set_fp32_optimizer_param_groups()  # ZeRO-3
    base = zero.optimizer.state_dict()
    zero._clear_fp32_optimizer_param_groups()
    return {"zero": 3, "base": base, "fp32": [t.detach().cpu().clone() for t in zero.fp32_partitioned_groups_flat]}


def load_optimizer_state(optimizer: Any, state: dict[str, Any], world_size: int = 1) -> None:
    """Inverse of :func:`optimizer_state` (same optimizer construction and world size)."""
    zero = _zero_optimizer(optimizer)
    if zero is None:
        getattr(optimizer, "optimizer", optimizer).load_state_dict(state)
        return
    if "zero" not in state:
        raise ValueError("checkpoint optimizer state is not a DeepSpeed ZeRO state; resume with the same launcher")
    # Start from the live state dict (it carries DeepSpeed's own objects) and swap in the tensors.
    current = zero.state_dict()
    if state["zero"] == 3:
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

        current[OPTIMIZER_STATE_DICT] = state["base"]
        current[FP32_FLAT_GROUPS] = [t.to(c.device) for t, c in zip(state["fp32"], zero.fp32_partitioned_groups_flat)]
        zero.load_state_dict([current] * world_size, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, SINGLE_PARTITION_OF_FP32_GROUPS

        current[BASE_OPTIMIZER_STATE] = state["base"]
        current[SINGLE_PARTITION_OF_FP32_GROUPS] = state["fp32"]
        zero.load_state_dict([current] * world_size, load_optimizer_states=True, load_from_fp32_weights=True)
