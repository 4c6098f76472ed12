"""Tools of the peak-memory model: fake tensors, a peak tracker, the CUDA autocast policy on CPU, RSS.

* :func:`to_fake` turns a model built on the meta device into one whose parameters and buffers
  are ``FakeTensor`` s on a chosen device: shapes, dtypes and storages without any memory, so a
  full-size update runs in seconds (``torch._subclasses.fake_tensor``).
* :class:`PeakTracker` is torch's ``MemTracker`` (a ``TorchDispatchMode`` that follows every
  storage through weak references, by category: parameters, buffers, gradients, activations,
  backward temporaries, optimizer state) with two changes: it accepts frozen parameters (the
  stock tracker hooks every parameter and fails on ``requires_grad=False``) and it keeps only the
  global peak (the per-module bookkeeping costs O(modules) per op).
* :func:`autocast` is ``torch.autocast`` on CPU with the **CUDA** op policy: CPU autocast keeps
  ``layer_norm``, ``group_norm``, ``softmax``, ``exp``, ``pow``, ``rsqrt``, ``sum`` ... in bf16, CUDA
  autocast runs them in fp32. Python kernels on the ``AutocastCPU`` dispatch key apply CUDA's
  float32 lists, so the traced graph (and what autograd saves) has a GPU's dtypes.
* :func:`rss_bytes` / :func:`reset_peak_rss` / :func:`peak_rss_bytes` read ``/proc/self/status``
  for the independent measurement of the validation (Linux).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

# --------------------------------------------------------------------------------------------
# Fake models
# --------------------------------------------------------------------------------------------


_SCALAR_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


class BookkeepingFakeMode(FakeTensorMode):
    """``FakeTensorMode`` that keeps small literal tensors as real constants.

    Fake tensors carry no values, so Python-side bookkeeping on a tensor literal fails in a stock
    fake mode (e.g. Qwen2-VL turns its image grid ``torch.tensor([[1, h, w]])`` into position ids and
    sequence lengths with ``.tolist()``). Here literals and results of ops on constants only, up to
    ``constant_limit`` elements, keep their real values; everything touching a weight stays fake.
    Real tensors from outside (a scheduler's sigma table) are accepted as inputs.
    """

    def __init__(self, constant_limit: int = 1 << 16) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.constant_limit = constant_limit
        self.value_reads = 0

    def dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Value reads of non-constant fakes (``bool(t)``, ``float(t)``) answer True / 0 and are counted.

        They only come from input/output checks (e.g. "all finite?") that have no answer without
        data; the memory does not depend on them.
        """
        if func in _SCALAR_READS and args and isinstance(args[0], FakeTensor) and args[0].constant is None:
            self.value_reads += 1
            dtype = args[0].dtype
            return True if dtype == torch.bool else (0.0 if dtype.is_floating_point else 0)
        return super().dispatch(func, types, args, kwargs)

    def may_turn_const(self, t: torch.Tensor) -> bool:
        return (
            t.numel() <= self.constant_limit
            and t.layout == torch.strided
            and not self.is_our_fake(t)
            and t.device.type != "meta"
        )


def new_fake_mode() -> FakeTensorMode:
    """The fake mode the memory model runs in (see :class:`BookkeepingFakeMode`)."""
    return BookkeepingFakeMode()


def to_fake(
    module: nn.Module, mode: FakeTensorMode, device: str | torch.device = "cpu", memo: dict[int, Any] | None = None
) -> nn.Module:
    """Replace the meta parameters/buffers of ``module`` by fake tensors on ``device`` (in place).

    Tensors shared between modules (tied weights, ``share_base_weights``) stay shared when the same
    ``memo`` is passed for every module. ``requires_grad`` is kept.
    """
    memo = {} if memo is None else memo
    dev = torch.device(device)
    convert = mode.fake_tensor_converter
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if isinstance(p, FakeTensor):  # converted already (a module reached twice)
                continue
            if id(p) not in memo:
                if p.device.type != "meta":
                    raise ValueError(f"to_fake expects a meta-device model; {name} is on {p.device}")
                fake = convert.from_meta_and_device(mode, p.data, dev)
                memo[id(p)] = nn.Parameter(fake, requires_grad=p.requires_grad)
            sub._parameters[name] = memo[id(p)]
        for name, b in list(sub._buffers.items()):
            if b is None:
                continue
            if isinstance(b, FakeTensor):
                continue
            if id(b) not in memo:
                memo[id(b)] = convert.from_meta_and_device(mode, b, dev) if b.device.type == "meta" else b
            sub._buffers[name] = memo[id(b)]
    return module


def tensor_bytes(*modules: nn.Module, buffers: bool = True) -> int:
    """Bytes of the distinct parameters (and buffers) of ``modules`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        tensors = list(m.parameters()) + (list(m.buffers()) if buffers else [])
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Peak tracker
# --------------------------------------------------------------------------------------------


class PeakTracker(MemTracker):
    """``MemTracker`` for partly frozen models, global peak only (see the module docstring).

    Usage: build models, ``tracker.track_external(*modules, optimizer, *inputs)``, then run the
    update inside ``with tracker:``; :meth:`peak` gives ``{category: bytes, "Total": bytes}``.
    """

    peak_phase: str = "start"  # "forward" | "backward" | "optimizer" once the peak grew during the run

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and param not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._grad_seen),
                        param.register_post_accumulate_grad_hook(lambda p: self._grad_seen(p.grad)),
                    )
        return out

    def _grad_seen(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)
                self.peak_phase = "optimizer" if self._in_opt else ("backward" if self._mod_tracker.is_bw else "forward")

    @staticmethod
    def _flatten(snapshot: dict[torch.device, dict[Any, int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for snap in snapshot.values():
            for key, value in snap.items():
                name = key.value if isinstance(key, _MemRefType) else str(key)
                out[name] = out.get(name, 0) + int(value)
        return out

    def peak(self) -> dict[str, int]:
        """Bytes per category at the peak (all devices summed); ``Total`` is the peak."""
        return self._flatten(self.get_tracker_snapshot("peak"))

    def current(self) -> dict[str, int]:
        return self._flatten(self.get_tracker_snapshot("current"))


# --------------------------------------------------------------------------------------------
# CUDA autocast policy on CPU tensors
# --------------------------------------------------------------------------------------------

#: Ops that CUDA autocast runs in float32 (inputs cast up), as documented for ``torch.amp`` on CUDA.
CUDA_FP32_OPS: tuple[str, ...] = (
    "acos", "asin", "cosh", "sinh", "tan", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
    "layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "cosine_similarity",
    "cdist", "dist", "pdist", "renorm", "logsumexp", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "kl_div", "binary_cross_entropy_with_logits",
)
#: Ops that CUDA autocast runs with ``dtype=float32`` unless the caller passed a dtype.
CUDA_FP32_DTYPE_OPS: tuple[str, ...] = (
    "softmax.int", "log_softmax.int", "cumsum", "cumprod", "prod", "sum", "sum.dim_IntList",
    "linalg_vector_norm",
)
_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_policy_depth = 0
_policy_lib: torch.library.Library | None = None


def _overload(name: str) -> Any:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64 and x.device.type == "cpu"


def _fp32_kernel(op: Any) -> Any:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        up = [a.float() if _eligible(a) else a for a in args]
        kw = {k: (v.float() if _eligible(v) else v) for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return op(*up, **kw)

    return kernel


def _fp32_dtype_kernel(op: Any) -> Any:
    names = [a.name for a in op._schema.arguments]
    index = names.index("dtype")
    kwarg_only = op._schema.arguments[index].kwarg_only

    def kernel(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        if args and _eligible(args[0]):
            if kwarg_only or index >= len(args):
                if kwargs.get("dtype") is None:
                    kwargs["dtype"] = torch.float32
            elif args[index] is None:
                args[index] = torch.float32
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While active, CPU autocast follows CUDA's float32 op lists (process-wide; re-entrant)."""
    global _policy_depth, _policy_lib
    if _policy_depth == 0:
        lib = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in CUDA_FP32_OPS:
                lib.impl(name, _fp32_kernel(_overload(name)), "AutocastCPU")
            for name in CUDA_FP32_DTYPE_OPS:
                lib.impl(name, _fp32_dtype_kernel(_overload(name)), "AutocastCPU")
        _policy_lib = lib
    _policy_depth += 1
    try:
        yield
    finally:
        _policy_depth -= 1
        if _policy_depth == 0 and _policy_lib is not None:
            _policy_lib._destroy()
            _policy_lib = None


@contextlib.contextmanager
def autocast(dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision as on a CUDA card (``dtype`` bf16/fp16) on CPU tensors; fp32: no autocast."""
    if dtype == torch.float32:
        yield
        return
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=dtype):
        yield


# --------------------------------------------------------------------------------------------
# Resident set size (validation)
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only)")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (or the process start)."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (``/proc/self/clear_refs``, Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")
