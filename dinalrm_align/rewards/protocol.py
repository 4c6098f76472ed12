"""The latent-reward protocol that every reward, adapter and trainer in this package speaks.

A *latent reward* is called with keyword arguments only and returns one float per sample::

    scores = reward(latents=latents,                       # (B, 16, h, w) normalised, unpacked latents
                    prompt_embeds=pe, pooled_prompt_embeds=pooled,   # the family's text outputs  -- or --
                    prompts=["a cat", ...],                # B strings
                    metadata=[{...}, ...])                 # B dicts (optional; e.g. {"seed": 3})
    scores.shape == (B,); scores.dtype == torch.float32

Conventions:

* ``latents`` are the reward family's normalised VAE latents ``(vae_latent - shift_factor) * scaling_factor``,
  unpacked to ``(B, 16, h, w)``: what ``StableDiffusion3Pipeline`` / ``ZImagePipeline(..., output_type="latent")``
  return; ``FluxPipeline`` returns them packed ``(B, N, 64)``: unpack with
  :func:`dinalrm_align.backbones.flux.unpack_latents` (never pixels, never raw VAE latents).
* Text embeddings are what the family's pipeline ``encode_prompt`` returns: SD3.5 ``(B, 77 + L, D)`` and
  pooled ``(B, P)``; FLUX.1 ``(B, L, D)`` and pooled ``(B, P)``; Z-Image a list of ``(L_i, D)`` tensors and
  no pooled vector (``None``). A :class:`~dinalrm_align.backbones.conditioning.TextConditioning` is accepted
  as ``prompt_embeds`` too.
* The call never builds a graph: it scores under ``torch.no_grad`` (GRPO, DDPO, NFT, logging).
* A reward declares what it needs in ``required_fields`` and what it can additionally use in
  ``optional_fields`` (field names below), so a trainer or :class:`~dinalrm_align.rewards.CompositeReward`
  knows what to pass. The requirement ``"text"`` means *either* ``prompts`` *or* both
  ``prompt_embeds`` and ``pooled_prompt_embeds`` (a reward that can encode prompts itself);
  ``"text_unpooled"`` (families without a pooled vector, Z-Image) means ``prompts`` or ``prompt_embeds``.
* Gradients are a separate, opt-in capability: :class:`DifferentiableLatentReward` adds
  ``score_differentiable(...)`` with the same arguments, returning scores differentiable w.r.t.
  ``latents`` (ReFL, DRaFT, AlignProp). A remote reward never has it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

#: Field names a reward can declare in ``required_fields`` / ``optional_fields``.
LATENTS = "latents"
PROMPT_EMBEDS = "prompt_embeds"
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds"
PROMPTS = "prompts"
METADATA = "metadata"
FIELDS: tuple[str, ...] = (LATENTS, PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS, PROMPTS, METADATA)
TEXT_EMBEDDINGS: tuple[str, ...] = (PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS)
#: Requirement token: ``prompts``, or ``prompt_embeds`` + ``pooled_prompt_embeds``.
TEXT = "text"
#: Requirement token of families without a pooled text vector (Z-Image): ``prompts``, or ``prompt_embeds``.
TEXT_UNPOOLED = "text_unpooled"


@runtime_checkable
class LatentReward(Protocol):
    """A no-grad reward on latents: keyword-only call -> float32 tensor (B,).

    Attributes:
        name: short name used as the key of this reward in composed outputs and logs.
        required_fields: fields the caller must pass (names from :data:`FIELDS`, :data:`TEXT` or
            :data:`TEXT_UNPOOLED`).
        optional_fields: fields used when given (e.g. embeddings instead of re-encoding prompts).
    """

    name: str
    required_fields: tuple[str, ...]
    optional_fields: tuple[str, ...]

    def __call__(
        self,
        *,
        latents: torch.Tensor,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor: ...


@runtime_checkable
class DifferentiableLatentReward(LatentReward, Protocol):
    """A latent reward that can also return scores with gradients w.r.t. ``latents``."""

    def score_differentiable(
        self,
        *,
        latents: torch.Tensor,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor: ...


def provided_fields(**inputs: Any) -> set[str]:
    """Names of the fields in ``inputs`` that are not ``None``."""
    return {name for name, value in inputs.items() if value is not None}


def satisfies(requirement: str, available: set[str]) -> bool:
    """Whether the passed fields meet one requirement (a field name, :data:`TEXT` or :data:`TEXT_UNPOOLED`)."""
    if requirement == TEXT:
        return PROMPTS in available or set(TEXT_EMBEDDINGS) <= available
    if requirement == TEXT_UNPOOLED:
        return PROMPTS in available or PROMPT_EMBEDS in available
    return requirement in available


def check_required_fields(reward: Any, available: set[str]) -> None:
    """Raise ``ValueError`` naming the reward and the missing fields, if any."""
    missing = [f for f in reward.required_fields if not satisfies(f, available)]
    if missing:
        raise ValueError(
            f"reward {reward.name!r} needs {missing} but the caller passed only {sorted(available)}; "
            f"it requires {list(reward.required_fields)}"
        )


def check_scores(scores: Any, batch_size: int, name: str) -> torch.Tensor:
    """A reward's output must be a (B,) tensor; returned as float32 (device unchanged)."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"reward {name!r} returned {type(scores).__name__}, expected a torch.Tensor (B,)")
    if tuple(scores.shape) != (batch_size,):
        raise ValueError(f"reward {name!r} returned shape {tuple(scores.shape)}, expected ({batch_size},)")
    return scores.float()


def batch_size_of(latents: Any) -> int:
    """B of a (B, C, h, w) latent tensor, with a clear error for anything else."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        hint = ""
        if isinstance(latents, torch.Tensor) and latents.dim() == 3:
            hint = (" (packed FLUX latents (B, N, 64), as FluxPipeline returns them with output_type='latent'? "
                    "unpack them with dinalrm_align.backbones.flux.unpack_latents(latents, h, w))")
        raise ValueError(f"latents must be a (B, C, h, w) tensor, got {shape}{hint}")
    return int(latents.shape[0])


def check_prompts(prompts: Any, batch_size: int) -> list[str]:
    """One string per sample."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings (one per sample), not a single string")
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise ValueError(f"got {batch_size} latents but {len(prompts)} prompts")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return prompts


def check_metadata(metadata: Any, batch_size: int) -> list[Mapping[str, Any]] | None:
    """One entry per sample; entries that are not mappings count as empty (trl passes any object)."""
    if metadata is None:
        return None
    metadata = list(metadata)
    if len(metadata) != batch_size:
        raise ValueError(f"got {batch_size} samples but {len(metadata)} metadata entries")
    return [m if isinstance(m, Mapping) else {} for m in metadata]
