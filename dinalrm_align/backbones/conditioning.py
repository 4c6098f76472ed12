"""``TextConditioning``: the prompt conditioning of a batch, the same container for every backbone.

Every backbone's text stack is reduced to three tensors:

* ``embeds`` ``(B, L, D)``: token features (SD3: CLIP + T5 ``77 + L`` tokens; FLUX: T5 tokens;
  Z-Image: the chat-templated Qwen3 tokens, padded to the longest caption of the batch);
* ``pooled`` ``(B, P)`` or ``None``: the pooled text vector (SD3 2048, FLUX 768, Z-Image none);
* ``mask`` ``(B, L)`` bool or ``None``: True marks real tokens; ``None`` means every token is real
  (fixed-length text stacks). Padded rows (mask False) never influence a score or a velocity: the
  backbone adapters drop them before calling the transformer and the reward head masks them.

The container supports what samplers and trainers need: slicing by sample, concatenation, tiling,
device/dtype moves, and a stable round-trip through a state dict (for checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TextConditioning"]


@dataclass
class TextConditioning:
    """Prompt conditioning of ``B`` samples (see the module docstring for the conventions)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.embeds, torch.Tensor) or self.embeds.ndim != 3:
            raise ValueError(
                f"TextConditioning.embeds must be a (B, L, D) tensor, got {getattr(self.embeds, 'shape', self.embeds)}"
            )
        b, length = self.embeds.shape[:2]
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != b):
            raise ValueError(f"TextConditioning.pooled must be ({b}, P), got {tuple(self.pooled.shape)}")
        if self.mask is not None and (tuple(self.mask.shape) != (b, length) or self.mask.dtype != torch.bool):
            raise ValueError(f"TextConditioning.mask must be a bool ({b}, {length}) tensor, got {self.mask.dtype} "
                             f"{tuple(self.mask.shape)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_list(cls, tokens: Sequence[torch.Tensor]) -> TextConditioning:
        """Variable-length ``[(L_i, D), ...]`` -> right-padded ``embeds`` with ``mask`` (no pooled)."""
        if len(tokens) == 0:
            raise ValueError("need at least one prompt embedding")
        for i, t in enumerate(tokens):
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] == 0:
                raise ValueError(f"prompt embedding {i} must be a non-empty (L, D) tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        width = tokens[0].shape[1]
        if any(t.shape[1] != width for t in tokens):
            raise ValueError(f"prompt embeddings have different widths: {[t.shape[1] for t in tokens]}")
        lengths = torch.tensor([t.shape[0] for t in tokens])
        embeds = torch.nn.utils.rnn.pad_sequence(list(tokens), batch_first=True)
        mask = torch.arange(embeds.shape[1])[None, :] < lengths[:, None]
        return cls(embeds, None, mask.to(embeds.device))

    @staticmethod
    def cat(items: Sequence[TextConditioning]) -> TextConditioning:
        """Concatenate along the batch (text lengths may differ: shorter ones are padded and masked)."""
        if not items:
            raise ValueError("nothing to concatenate")
        length = max(c.embeds.shape[1] for c in items)
        if all(c.embeds.shape[1] == length for c in items) and all(c.mask is None for c in items):
            embeds = torch.cat([c.embeds for c in items])
            mask = None
        else:
            embeds = torch.cat([torch.nn.functional.pad(c.embeds, (0, 0, 0, length - c.embeds.shape[1])) for c in items])
            mask = torch.cat([torch.nn.functional.pad(c.token_mask(), (0, length - c.embeds.shape[1])) for c in items])
        pooled = None
        if any(c.pooled is not None for c in items):
            if not all(c.pooled is not None for c in items):
                raise ValueError("cannot concatenate conditionings with and without a pooled vector")
            pooled = torch.cat([c.pooled for c in items])  # type: ignore[misc]
        return TextConditioning(embeds, pooled, mask)

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def token_mask(self) -> torch.Tensor:
        """``(B, L)`` bool mask (all True when ``mask`` is None)."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.embeds.shape[:2], dtype=torch.bool, device=self.embeds.device)

    def lengths(self) -> list[int]:
        """Number of real tokens per sample."""
        if self.mask is None:
            return [self.embeds.shape[1]] * len(self)
        return [int(n) for n in self.mask.sum(dim=1).tolist()]

    def token_list(self) -> list[torch.Tensor]:
        """The real tokens of each sample, ``[(L_i, D), ...]`` (the variable-length form)."""
        if self.mask is None:
            return list(self.embeds.unbind(0))
        return [e[m] for e, m in zip(self.embeds, self.mask)]

    def __getitem__(self, index: Any) -> TextConditioning:
        """Select samples (int, slice, index list / tensor or bool mask); keeps the batch dim."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        pooled = None if self.pooled is None else self.pooled[index]
        mask = None if self.mask is None else self.mask[index]
        return TextConditioning(self.embeds[index], pooled, mask)

    def repeat(self, times: int) -> TextConditioning:
        """The batch tiled ``times`` times: ``[c_0..c_{B-1}, c_0..c_{B-1}, ...]``."""
        pooled = None if self.pooled is None else self.pooled.repeat(times, 1)
        mask = None if self.mask is None else self.mask.repeat(times, 1)
        return TextConditioning(self.embeds.repeat(times, 1, 1), pooled, mask)

    def expand(self, batch: int) -> TextConditioning:
        """A batch-1 conditioning broadcast to ``batch`` rows (a no-op if it already has ``batch`` rows)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of batch {len(self)} to {batch}")
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        mask = None if self.mask is None else self.mask.expand(batch, -1)
        return TextConditioning(self.embeds.expand(batch, -1, -1), pooled, mask)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextConditioning:
        """Move (and cast the float tensors; the mask stays bool)."""
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        mask = None if self.mask is None else self.mask.to(device=device)
        return TextConditioning(self.embeds.to(device=device, dtype=dtype), pooled, mask)

    def detach(self) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled.detach()
        return TextConditioning(self.embeds.detach(), pooled, self.mask)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (``weights_only``-safe); absent parts are omitted."""
        state = {"embeds": self.embeds.detach().cpu()}
        if self.pooled is not None:
            state["pooled"] = self.pooled.detach().cpu()
        if self.mask is not None:
            state["mask"] = self.mask.cpu()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device | str | None = None) -> TextConditioning:
        return cls(
            state["embeds"].to(device),
            state["pooled"].to(device) if "pooled" in state else None,
            state["mask"].to(device) if "mask" in state else None,
        )
