"""EMA of the trainable weights: diffusers' ``EMAModel`` with a swap-in context and ZeRO-3 gathering.

The decay schedule and its horizon are documented on :class:`~dinalrm_align.trainer.sections.EMAConfig`.
The shadow weights have the trainable parameters' dtype (fp32) and device. ``state_dict`` / ``load_state_dict`` make the
object checkpointable with ``accelerator.register_for_checkpointing`` (tensors and plain types only).
For parameters partitioned by DeepSpeed ZeRO-3 pass ``gather``: a context factory ``gather(params,
modify)`` that makes the full tensors available (and with ``modify`` re-partitions what was written).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from dinalrm_align.trainer.sections import EMAConfig

Gather = Callable[[Sequence[torch.nn.Parameter], bool], contextlib.AbstractContextManager]

__all__ = ["EMA"]


def _no_gather(params: Sequence[torch.nn.Parameter], modify: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _ema_gathers_itself() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


class EMA:
    """EMA of ``params`` (a fixed, ordered list of trainable parameters)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], config: EMAConfig, gather: Gather | None = None) -> None:
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.config = config
        self.gather = gather or _no_gather
        with self.gather(self.params, False), torch.no_grad():
            self.model = EMAModel(
                self.params,
                decay=config.decay,
                min_decay=config.min_decay,
                update_after_step=config.update_after_step,
                use_ema_warmup=config.warmup,
                inv_gamma=config.inv_gamma,
                power=config.power,
                foreach=config.foreach,
            )

    @property
    def num_updates(self) -> int:
        return int(self.model.optimization_step)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return float(self.model.get_decay(self.model.optimization_step + 1))

    @torch.no_grad()
    def step(self, global_step: int) -> bool:
        """Update the average if ``global_step`` is a multiple of ``update_every``; True if updated."""
        if global_step % self.config.update_every != 0:
            return False
        # EMAModel gathers ZeRO-3 partitions itself when transformers knows about ZeRO-3 (accelerate tells it);
        # DeepSpeed refuses nested gathers of the same parameters.
        gather = contextlib.nullcontext() if _ema_gathers_itself() else self.gather(self.params, False)
        with gather:
            self.model.step(self.params)
        return True

    @torch.no_grad()
    def _write(self, values: Sequence[torch.Tensor]) -> None:
        with self.gather(self.params, True):
            for v, p in zip(values, self.params):
                p.data.copy_(v.to(device=p.device, dtype=p.dtype))

    def copy_to(self) -> None:
        """Write the averaged weights into the tracked parameters."""
        self._write(self.model.shadow_params)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Temporarily replace the live weights by the EMA weights (restored exactly on exit)."""
        with self.gather(self.params, False), torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
        try:
            self.copy_to()
            yield
        finally:
            self._write(backup)

    def state_dict(self) -> dict[str, Any]:
        state = self.model.state_dict()
        state["shadow_params"] = [s.detach().cpu() for s in state["shadow_params"]]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state.get("shadow_params")
        if shadow is None or len(shadow) != len(self.model.shadow_params):
            raise ValueError(
                f"EMA state has {0 if shadow is None else len(shadow)} tensors, the model has "
                f"{len(self.model.shadow_params)} trainable ones"
            )
        for own, saved in zip(self.model.shadow_params, shadow):
            if tuple(own.shape) != tuple(saved.shape):
                raise ValueError(f"EMA tensor shape mismatch: {tuple(saved.shape)} vs {tuple(own.shape)}")
        device = self.model.shadow_params[0].device
        self.model.load_state_dict(state)
        self.model.to(device=device)
        steps = self.model.optimization_step  # the decay of the last update is not part of diffusers' state
        self.model.cur_decay_value = float(self.model.get_decay(steps)) if steps > 0 else None
