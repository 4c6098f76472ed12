"""Timing and memory measurement helpers (CPU and CUDA).

* :func:`alternating_medians` runs several workloads round-robin in one process (so that a slow
  neighbour on a shared machine slows all of them alike) and reports medians.
* :class:`PeakTensorMemory` tracks the peak bytes of tensors *created inside* a region on any
  device, by watching every op's outputs through a ``TorchDispatchMode`` (CPU has no allocator
  statistics). Weights that exist before the region are not counted; activations saved for the
  backward pass, gradients and temporaries are.
"""

from __future__ import annotations

import gc
import statistics
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class TimingStats:
    """Wall-clock statistics of one workload, in seconds."""

    median: float
    minimum: float
    maximum: float
    repeats: int

    def to_dict(self) -> dict[str, float]:
        return {"median_s": self.median, "min_s": self.minimum, "max_s": self.maximum, "repeats": self.repeats}


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def alternating_medians(
    workloads: Mapping[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, TimingStats]:
    """Run ``workloads`` round-robin ``warmup + repeats`` times; medians of the timed rounds.

    The order inside each round rotates, so no workload always runs first (cache/turbo effects).
    """
    names = list(workloads)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            workloads[name]()
            _sync(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {
        n: TimingStats(statistics.median(s), min(s), max(s), len(s)) for n, s in samples.items()
    }


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages allocated while the mode is active.

    Usage::

        with PeakTensorMemory() as mem:
            loss = model(x).sum(); loss.backward()
        mem.peak_bytes

    Storages are identified by data pointer; a storage is released when the last tensor seen
    on it is garbage collected (views and in-place results share their base's storage).
    Tensors saved by autograd stay alive until the backward pass frees them, as in reality.
    Allocator rounding/caching and library workspaces are not included.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak_bytes = 0
        self._live: dict[tuple[str, int], list[int]] = {}  # key -> [nbytes, n_tensors]

    def _release(self, key: tuple[str, int]) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self._live[key]

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        ptr = storage.data_ptr()
        if ptr == 0:
            return
        key = (str(tensor.device), ptr)
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = entry = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak_bytes = max(self.peak_bytes, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out

    def __enter__(self) -> PeakTensorMemory:
        gc.collect()
        return super().__enter__()


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes of tensors created while ``fn()`` runs.

    CUDA: the allocator's ``max_memory_allocated`` above the starting allocation. Elsewhere:
    :class:`PeakTensorMemory`.
    """
    if device is not None and torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with PeakTensorMemory() as tracker:
        fn()
    return int(tracker.peak_bytes)
