"""The reward backbone: a truncated copy of the family's own diffusers transformer, tapped with hooks.

The copy keeps the embedders and the first ``num_layers`` blocks of the adapter's tap list and drops the
rest (FLUX: every single-stream block), so the dropped blocks are never computed and their weights are
not held. Features come from forward hooks on the kept blocks while diffusers' unmodified forward runs
on the copy: rotary embeddings, masks, padding and time scaling are diffusers' own. Block ``i`` (1-based)
is tap ``i``; tap ``0`` is the first block's input (the embeddings). The embedding the blocks are
modulated with (``temb``) is hooked from the adapter's ``temb_module``. The forward stops right after the
deepest tap (:class:`StopForward`), so nothing after it is computed, and the output layers the head never
reads (``adapter.unused_modules``) are not even copied: the reward costs exactly its kept blocks,
embedders and head.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Features", "StopForward", "TapRecorder", "truncated_copy"]


@dataclass
class Features:
    """Tapped features of one forward.

    Attributes:
        image: per tap ``(B, N_img, D)``: the image tokens in the transformer's own token order (padding removed).
        text: per tap ``(B, L, D)``: the text tokens.
        text_mask: ``(B, L)`` bool, True = real token; None when every row is real.
        temb: ``(B, E)``, the embedding the blocks are modulated with.
    """

    image: list[torch.Tensor]
    text: list[torch.Tensor]
    text_mask: torch.Tensor | None
    temb: torch.Tensor


def _strip_adapters(module: nn.Module) -> None:
    """Replace any peft-wrapped layers (e.g. a policy LoRA) by their base layers, and forget peft configs."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            _strip_adapters(child)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in module.__dict__:
            delattr(module, attr)


class StopForward(Exception):
    """Raised by the deepest tap's hook to end the backbone forward once every feature is recorded."""


def truncated_copy(transformer: nn.Module, adapter: Any, num_layers: int, share_base_weights: bool = False) -> nn.Module:
    """A copy of ``transformer`` with the first ``num_layers`` blocks of ``adapter.tap_list``, none of
    ``adapter.dropped_lists`` and none of ``adapter.unused_modules`` (the output layers). With ``share_base_weights`` the copy's parameters ARE the transformer's
    tensors (no memory for a second copy; the modules are new, so a LoRA on the copy never touches the
    original). A peft adapter already on the transformer is not copied."""
    lists: dict[str, nn.Module | None] = {
        adapter.tap_list: nn.ModuleList(list(getattr(transformer, adapter.tap_list))[:num_layers])
    }
    lists.update({name: nn.ModuleList() for name in adapter.dropped_lists})
    lists.update({name: None for name in adapter.unused_modules if name in transformer._modules})
    saved = {name: transformer._modules[name] for name in lists}
    try:
        for name, module in lists.items():
            transformer._modules[name] = module
        memo: dict[int, Any] = {}
        if share_base_weights:
            memo = {id(t): t for t in itertools.chain(transformer.parameters(), transformer.buffers())}
        copied = copy.deepcopy(transformer, memo)
    finally:
        for name, module in saved.items():
            transformer._modules[name] = module
    _strip_adapters(copied)
    for hooks in ("_forward_hooks", "_forward_pre_hooks"):
        for module in copied.modules():
            getattr(module, hooks).clear()
    return copied


class TapRecorder:
    """Forward hooks on a truncated transformer that record the taps of one forward.

    Hooks only record inside :meth:`recording`; elsewhere (e.g. the recomputation of gradient
    checkpointing in the backward pass) they do nothing. While recording, the deepest tap's hook raises
    :class:`StopForward` (catch it around the forward). Hooks are bound methods / partials (no closures), so
    ``copy.deepcopy`` of a model holding the recorder gives hooks that write into the copy's recorder.
    """

    def __init__(self, transformer: nn.Module, adapter: Any, taps: Sequence[int]) -> None:
        self.adapter = adapter
        self.taps = sorted(set(int(t) for t in taps))
        blocks = getattr(transformer, adapter.tap_list)
        self._record: dict[Any, Any] | None = None
        self._meta: dict[str, Any] = {}
        self._handles = []
        for tap in self.taps:
            if tap == 0:
                self._handles.append(blocks[0].register_forward_pre_hook(self._input_hook, with_kwargs=True))
            else:
                hook = functools.partial(self._output_hook, tap)
                self._handles.append(blocks[tap - 1].register_forward_hook(hook))
        temb = adapter.temb_module(transformer)
        self._handles.append(temb.register_forward_hook(self._temb_hook))

    def _input_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._record is not None and 0 not in self._record:
            self._record[0] = self.adapter.split_tap_input(args, kwargs, self._meta)

    def _output_hook(self, tap: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._record is not None:
            self._record[tap] = self.adapter.split_tap(output, self._meta)
            if tap == self.taps[-1]:
                raise StopForward

    def _temb_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._record is not None and "temb" not in self._record:
            self._record["temb"] = output

    @contextlib.contextmanager
    def recording(self, meta: dict[str, Any]) -> Iterator[dict[Any, Any]]:
        """Record the taps of the forward run inside the context into the yielded dict."""
        self._meta = meta
        self._record = {}
        try:
            yield self._record
        finally:
            self._record = None

    def features(self, record: dict[Any, Any], visual_taps: Sequence[int], text_taps: Sequence[int]) -> Features:
        missing = [t for t in self.taps if t not in record]
        if missing or "temb" not in record:
            raise RuntimeError(f"the backbone forward did not reach taps {missing or ['temb']}")
        image = [record[t][0] for t in visual_taps]
        text = [record[t][1] for t in text_taps]
        mask = next((record[t][2] for t in text_taps if record[t][2] is not None), None)
        return Features(image, text, mask, record["temb"])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
