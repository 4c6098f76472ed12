"""Prompt encoding with any supported pipeline's own text stack (frozen, no gradients).

:func:`encode_prompts` returns exactly what the pipeline's ``encode_prompt`` returns at that length:

* SD3.5: CLIP-L + CLIP-G penultimate states and T5 -> ``prompt_embeds (B, 77 + L, 4096)``, pooled ``(B, 2048)``;
* FLUX.1: T5 tokens ``(B, L, 4096)``, pooled CLIP-L ``(B, 768)``;
* Z-Image: a list of variable-length ``(L_i, 2560)`` Qwen3 tensors, pooled ``None``.

``max_sequence_length=128`` matches how DiNa-LRM reward models are trained. Prompts are encoded in
batches and optionally cached per ``(prompt, length)``; a prompt's embedding never depends on the other
prompts of its batch (fixed-length stacks pad to the length, Z-Image masks the padding).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from dinalrm_align.backbones.conditioning import TextConditioning
from dinalrm_align.backbones.registry import adapter_for

__all__ = ["PromptEmbeddingCache", "encode_conditioning", "encode_prompts", "private_tokenizers"]

_Entry = tuple[torch.Tensor, "torch.Tensor | None"]


class PromptEmbeddingCache:
    """LRU cache of per-prompt embeddings (tokens ``(L, D)``, pooled ``(P,)`` or None), keyed by
    ``(pipeline class, prompt, max_sequence_length)``. Useful when the same prompts are scored repeatedly."""

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size
        self._store: OrderedDict[tuple[str, str, int], _Entry] = OrderedDict()

    def get(self, key: tuple[str, str, int]) -> _Entry | None:
        item = self._store.get(key)
        if item is not None:
            self._store.move_to_end(key)
        return item

    def put(self, key: tuple[str, str, int], value: _Entry) -> None:
        self._store[key] = value
        self._store.move_to_end(key)
        while len(self._store) > self.max_size:
            self._store.popitem(last=False)

    def __len__(self) -> int:
        return len(self._store)


def _check_prompts(prompts: Sequence[str] | str, max_sequence_length: int) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must contain at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
    return prompts


@torch.no_grad()
def _entries(pipe: Any, prompts: list[str], max_sequence_length: int, batch_size: int,
             cache: PromptEmbeddingCache | None) -> tuple[Any, list[_Entry]]:
    adapter = adapter_for(pipe)
    kind = type(pipe).__name__
    results: dict[str, _Entry] = {}
    todo = []
    for prompt in dict.fromkeys(prompts):
        hit = cache.get((kind, prompt, max_sequence_length)) if cache is not None else None
        if hit is not None:
            results[prompt] = hit
        else:
            todo.append(prompt)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        cond = adapter.conditioning(*adapter.encode_prompt(pipe, chunk, max_sequence_length))
        tokens = cond.token_list()
        for j, prompt in enumerate(chunk):
            entry = (tokens[j], None if cond.pooled is None else cond.pooled[j])
            results[prompt] = entry
            if cache is not None:
                cache.put((kind, prompt, max_sequence_length), entry)
    return adapter, [results[p] for p in prompts]


def _move(x: torch.Tensor | None, device: Any, dtype: Any) -> torch.Tensor | None:
    return None if x is None else x.to(device=device, dtype=dtype)


def encode_conditioning(
    pipe: Any,
    prompts: Sequence[str] | str,
    max_sequence_length: int = 128,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 32,
    cache: PromptEmbeddingCache | None = None,
) -> TextConditioning:
    """Encode prompts into a :class:`TextConditioning` (variable lengths padded, with a mask)."""
    prompts = _check_prompts(prompts, max_sequence_length)
    _, entries = _entries(pipe, prompts, max_sequence_length, batch_size, cache)
    tokens = [_move(t, device, dtype) for t, _ in entries]
    if len({t.shape[0] for t in tokens}) == 1:
        cond = TextConditioning(torch.stack(tokens))  # type: ignore[arg-type]
    else:
        cond = TextConditioning.from_list(tokens)  # type: ignore[arg-type]
    if entries[0][1] is not None:
        cond = TextConditioning(cond.embeds, torch.stack([_move(p, device, dtype) for _, p in entries]), cond.mask)
    return cond


def encode_prompts(
    pipe: Any,
    prompts: Sequence[str] | str,
    max_sequence_length: int = 128,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 32,
    cache: PromptEmbeddingCache | None = None,
) -> tuple[Any, torch.Tensor | None]:
    """Encode prompts with the pipeline's own text stack -> ``(prompt_embeds, pooled_prompt_embeds)`` in
    the pipeline's native form (see the module docstring).

    Args:
        pipe: a ``StableDiffusion3Pipeline``, ``FluxPipeline`` or ``ZImagePipeline``.
        prompts: a string or a list of strings.
        max_sequence_length: text length (128 = how the reward models were trained).
        device, dtype: where / which dtype the outputs go (default: the encoders').
        batch_size: prompts per encoder call.
        cache: optional :class:`PromptEmbeddingCache` for repeated prompts.
    """
    prompts = _check_prompts(prompts, max_sequence_length)
    adapter, entries = _entries(pipe, prompts, max_sequence_length, batch_size, cache)
    tokens = [_move(t, device, dtype) for t, _ in entries]
    pooled = None if entries[0][1] is None else torch.stack([_move(p, device, dtype) for _, p in entries])
    if adapter.variable_length_text:
        return tokens, pooled
    return torch.stack(tokens), pooled  # type: ignore[arg-type]


def private_tokenizers(pipeline: Any) -> Any:
    """A shallow copy of ``pipeline`` with its own copies of the tokenizers (models, VAE and scheduler shared).

    Trainers encode prompts with the policy pipeline's tokenizers in their main thread while the reward runs in
    a worker thread. Fast tokenizers keep their padding / truncation settings as state that every call
    rewrites, so two threads encoding through the same tokenizer corrupt each other's token lengths (a CLIP
    call padded to 77 tokens can come back padded to the longest prompt). Reading the text through private
    tokenizers removes that race; the text encoders themselves are shared (inference only, no state).
    """
    names = [n for n, value in vars(pipeline).items() if n.startswith("tokenizer") and callable(value)]
    if not names:
        return pipeline
    view = copy.copy(pipeline)
    for name in names:
        object.__setattr__(view, name, copy.deepcopy(getattr(pipeline, name)))
    return view
