"""SD3 prompt encoding (frozen text stack) for the reward model and the trainers.

Standard SD3 encoding:

* CLIP-L and CLIP-G: pad/truncate to 77 tokens; per-token features = penultimate hidden layer;
  pooled = the projected text embedding. The two token sequences are concatenated along
  channels and zero-padded to the T5 width.
* T5: pad/truncate to ``max_sequence_length`` (no attention mask), last hidden state. Without a
  T5 encoder (SD3 without T5) zeros of the joint width are used, as diffusers does.
* ``prompt_embeds`` = [CLIP (77) ; T5 (L)] along the sequence -> (B, 77 + L, joint_dim);
  ``pooled`` = [CLIP-L pooled ; CLIP-G pooled] -> (B, pooled_dim).

``max_sequence_length=128`` matches how DiNa-LRM was trained (pad tokens are attended to, so L
changes the score slightly).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

CLIP_MAX_LENGTH = 77


@dataclass
class TextStack:
    """The three SD3 text encoders and their tokenizers (T5 may be absent)."""

    tokenizer: Any
    text_encoder: Any
    tokenizer_2: Any
    text_encoder_2: Any
    tokenizer_3: Any = None
    text_encoder_3: Any = None
    joint_dim: int | None = None

    @classmethod
    def from_pipeline(cls, pipe: Any) -> TextStack:
        joint = getattr(
            getattr(getattr(pipe, "transformer", None), "config", None), "joint_attention_dim", None
        )
        return cls(
            pipe.tokenizer,
            pipe.text_encoder,
            pipe.tokenizer_2,
            pipe.text_encoder_2,
            getattr(pipe, "tokenizer_3", None),
            getattr(pipe, "text_encoder_3", None),
            joint,
        )


class PromptEmbeddingCache:
    """LRU cache of per-prompt embeddings, keyed by ``(prompt, max_sequence_length)``.

    Useful when the same prompts are scored repeatedly (GRPO groups, evaluation sets).
    """

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size
        self._store: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, key: tuple[str, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        item = self._store.get(key)
        if item is not None:
            self._store.move_to_end(key)
        return item

    def put(self, key: tuple[str, int], value: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._store[key] = value
        self._store.move_to_end(key)
        while len(self._store) > self.max_size:
            self._store.popitem(last=False)

    def __len__(self) -> int:
        return len(self._store)


def _device_of(module: Any) -> torch.device:
    return next(module.parameters()).device


def _clip(tokenizer: Any, encoder: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer(
        prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    out = encoder(ids.to(_device_of(encoder)), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def _t5(tokenizer: Any, encoder: Any, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    return encoder(ids.to(_device_of(encoder)))[0]


@torch.no_grad()
def _encode_batch(
    stack: TextStack, prompts: list[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    clip_l, pooled_l = _clip(stack.tokenizer, stack.text_encoder, prompts)
    clip_g, pooled_g = _clip(stack.tokenizer_2, stack.text_encoder_2, prompts)
    clip = torch.cat([clip_l, clip_g.to(clip_l.dtype)], dim=-1)
    if stack.text_encoder_3 is not None:
        t5 = _t5(stack.tokenizer_3, stack.text_encoder_3, prompts, max_sequence_length)
    else:
        width = stack.joint_dim or 4096
        t5 = torch.zeros(len(prompts), max_sequence_length, width, device=clip.device, dtype=clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    prompt_embeds = torch.cat([clip.to(t5.dtype), t5], dim=-2)
    pooled = torch.cat([pooled_l, pooled_g.to(pooled_l.dtype)], dim=-1)
    return prompt_embeds, pooled


def encode_prompts(
    pipe_or_stack: Any,
    prompts: Sequence[str] | str,
    max_sequence_length: int = 128,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 32,
    cache: PromptEmbeddingCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts with the SD3 text stack (no gradients).

    Args:
        pipe_or_stack: a ``StableDiffusion3Pipeline`` or a :class:`TextStack`.
        prompts: a string or a list of strings.
        max_sequence_length: T5 length L (128 = DiNa-LRM training; README examples use 256).
        device, dtype: where/which dtype the outputs go (default: the encoders').
        batch_size: prompts per encoder call.
        cache: optional :class:`PromptEmbeddingCache` for repeated prompts.

    Returns:
        ``prompt_embeds`` (B, 77 + L, joint_dim) and ``pooled_prompt_embeds`` (B, pooled_dim).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must contain at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    if (
        isinstance(max_sequence_length, bool)
        or not isinstance(max_sequence_length, int)
        or max_sequence_length < 1
    ):
        raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
    stack = pipe_or_stack if isinstance(pipe_or_stack, TextStack) else TextStack.from_pipeline(pipe_or_stack)

    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(prompts)
    todo: list[int] = []
    for i, prompt in enumerate(prompts):
        hit = cache.get((prompt, max_sequence_length)) if cache is not None else None
        if hit is not None:
            results[i] = hit
        else:
            todo.append(i)
    unique = list(dict.fromkeys(prompts[i] for i in todo))
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        pe, pooled = _encode_batch(stack, chunk, max_sequence_length)
        for j, prompt in enumerate(chunk):
            encoded[prompt] = (pe[j], pooled[j])
            if cache is not None:
                cache.put((prompt, max_sequence_length), encoded[prompt])
    for i in todo:
        results[i] = encoded[prompts[i]]
    prompt_embeds = torch.stack([r[0] for r in results])  # type: ignore[index]
    pooled = torch.stack([r[1] for r in results])  # type: ignore[index]
    if device is not None or dtype is not None:
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        pooled = pooled.to(device=device, dtype=dtype)
    return prompt_embeds, pooled
