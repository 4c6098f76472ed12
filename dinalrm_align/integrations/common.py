"""Shared plumbing of the trainer integrations: final-latent checks, unpacking and one scoring core.

Every integration in this package hands the reward the *final, clean latents* a trainer's sampler produced
and gets one score per sample back. What differs between trainers is only the calling convention around
that, so the common parts live here:

* :func:`final_latents`: whatever the trainer holds -> unpacked, normalised ``(B, C, h, w)`` latents, with a
  clear ``ValueError`` for the usual slips (a whole ``(B, T+1, C, h, w)`` trajectory, a list of per-step
  latents, FLUX's packed ``(B, N, 64)`` tokens without the image size, ``latents[-1]`` of a stacked
  trajectory, which is the last *sample* of the batch and not the final step);
* :class:`LatentScoring`: a :class:`~dinalrm_align.rewards.composition.CompositeReward` plus the backbone
  adapter that knows the family's latent layout; it scores ``(latents, prompts, metadata)`` with or without
  gradients and returns ``{name: (B,) float32, ..., "avg": (B,)}`` tensors on the latents' device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dinalrm_align.backbones.base import BackboneAdapter
from dinalrm_align.reward_model.text import private_tokenizers
from dinalrm_align.rewards import protocol as P
from dinalrm_align.rewards.composition import CompositeReward, as_composite
from dinalrm_align.rewards.dinalrm import resolve_pipeline

__all__ = ["LatentScoring", "build_scoring", "final_latents", "private_tokenizers", "prompt_list"]


def _trajectory_hint(shape: tuple[int, ...]) -> str:
    return (
        f"got a {len(shape)}-D tensor {shape}, which looks like a whole sampling trajectory (B, T+1, ...); "
        "the reward takes the final latents: pass latents[:, -1] (batch first). latents[-1] would be the "
        "last sample's trajectory, not the final step of every sample"
    )


def final_latents(
    latents: Any,
    *,
    adapter: Any = None,
    pipeline: Any = None,
    channels: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """The final latents as the reward reads them: unpacked, normalised ``(B, C, h, w)``.

    Args:
        latents: ``(B, C, h, w)`` (SD3.5, Z-Image, or FLUX already unpacked) or FLUX's packed
            ``(B, (h/2)(w/2), 4C)`` tokens (what ``FluxPipeline(..., output_type="latent")`` and samplers built on
            it return).
        adapter: the family's backbone adapter (unpacks packed latents); ``None``: no unpacking.
        pipeline: a pipeline of that family (its VAE scale factor converts ``height``/``width`` to latent sizes).
        channels: latent channels the reward expects (``C``, 16 for every built-in family); used for hints.
        height, width: image size in pixels; needed only to unpack packed latents.

    Raises:
        ValueError: not a tensor; a list/tuple of per-step latents; a 5-D trajectory; a 4-D tensor whose
            second axis is not ``channels`` but whose layout matches a packed trajectory ``(B, T+1, N, 4C)``;
            packed latents of a family without packing, or without ``height``/``width``/``pipeline``.
    """
    if isinstance(latents, (list, tuple)):
        raise ValueError(
            f"got a {type(latents).__name__} of {len(latents)} latents (a sampler's per-step trajectory?); "
            "pass the final latents as one (B, C, h, w) tensor: trajectory[-1] for the list, or "
            "torch.stack(trajectory, dim=1)[:, -1]"
        )
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    shape = tuple(latents.shape)
    if latents.ndim == 5:
        raise ValueError(_trajectory_hint(shape))
    # a family packs its latents when its adapter overrides the (identity) unpacking
    packs = adapter is not None and type(adapter).unpack_pipeline_latents is not BackboneAdapter.unpack_pipeline_latents
    if latents.ndim == 4:
        if channels is not None and shape[1] != channels and packs and shape[-1] == 4 * channels:
            raise ValueError(_trajectory_hint(shape) + " (a packed FLUX trajectory (B, T+1, N, 64))")
        if channels is not None and shape[1] != channels:
            raise ValueError(
                f"latents must be (B, {channels}, h, w), got {shape}; if this is a stacked trajectory "
                "(B, T+1, C, h, w) squeezed or sliced the wrong way, pass latents[:, -1] of the (B, T+1, ...) tensor"
            )
        return latents
    if latents.ndim == 3:
        if not packs:
            family = getattr(adapter, "name", None)
            raise ValueError(
                f"latents must be (B, C, h, w), got {shape}"
                + (f"; the {family} family has no packed latent layout" if family else
                   " (packed FLUX latents need the FLUX reward, which knows how to unpack them)")
            )
        if height is None or width is None:
            raise ValueError(
                f"packed latents {shape} need the image size to unpack: pass height= and width= (pixels, as "
                "given to the sampler)"
            )
        if pipeline is None or getattr(pipeline, "vae", None) is None:
            raise ValueError(
                "unpacking packed latents needs the reward's pipeline (its VAE scale factor); or unpack them "
                "yourself with dinalrm_align.backbones.flux.unpack_latents(tokens, h, w)"
            )
        return adapter.unpack_pipeline_latents(pipeline, latents, int(height), int(width))
    raise ValueError(f"latents must be a (B, C, h, w) tensor (or packed (B, N, 64) FLUX tokens), got {shape}")


def prompt_list(prompts: Any, batch_size: int) -> list[str]:
    """``prompts`` as B strings (a single string is accepted for ``B == 1``); ValueError on a count mismatch."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is None:
        raise ValueError("prompts are required (one string per sample)")
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise ValueError(
            f"got {batch_size} latents but {len(prompts)} prompts (one prompt per sample is needed; if the latents "
            "are latents[-1] of a stacked (B, T+1, ...) trajectory, that is one sample's whole trajectory: pass "
            "latents[:, -1])"
        )
    return P.check_prompts(prompts, batch_size)


class LatentScoring:
    """A reward (composite) plus the knowledge needed to turn a trainer's latents into what it reads.

    Args:
        reward: the :class:`CompositeReward` to evaluate.
        adapter: backbone adapter of the latents' family (unpacking, expected channels); ``None`` for none.
        pipeline: a loaded pipeline of that family (VAE scale factor for unpacking), or ``None``.
        height, width: default image size in pixels (only needed for packed FLUX latents).
    """

    def __init__(
        self,
        reward: CompositeReward,
        adapter: Any = None,
        pipeline: Any = None,
        *,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        for name, value in (("height", height), ("width", width)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer (pixels), got {value!r}")
        self.reward = reward
        self.adapter = adapter
        self.pipeline = pipeline
        self.height = height
        self.width = width
        model = _first_model(reward)
        self.channels: int | None = (
            int(model.adapter.latent_channels(model.backbone)) if model is not None else None
        )

    def latents(self, latents: Any, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The trainer's final latents -> unpacked ``(B, C, h, w)`` (see :func:`final_latents`)."""
        return final_latents(
            latents, adapter=self.adapter, pipeline=self.pipeline, channels=self.channels,
            height=height if height is not None else self.height,
            width=width if width is not None else self.width,
        )

    def details(
        self,
        latents: Any,
        prompts: Any = None,
        metadata: Sequence[Any] | None = None,
        *,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        differentiable: bool = False,
        height: int | None = None,
        width: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{name: (B,) float32, ..., "avg": (B,)}`` on the latents' device.

        ``differentiable=True`` keeps the graph to ``latents`` (every component must support it); otherwise
        the scores carry no graph. Prompts (B strings) or the family's embeddings must be given.
        """
        x = self.latents(latents, height, width)
        b = int(x.shape[0])
        texts = prompt_list(prompts, b) if prompts is not None else None
        if texts is None and prompt_embeds is None:
            raise ValueError("pass prompts (one string per sample) or the family's prompt embeddings")
        inputs = dict(
            latents=x, prompts=texts, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            metadata=P.check_metadata(metadata, b),
        )
        if differentiable:
            return self.reward.score_differentiable_details(**inputs)
        return self.reward(**inputs)

    def set_step(self, step: int) -> None:
        """Mix ``step`` (e.g. the epoch) into the reward's noise seeds (reproducible after a restart)."""
        self.reward.set_step(step)


def _first_model(reward: CompositeReward) -> Any:
    for component in reward.unique_rewards:
        model = getattr(component, "model", None)
        if model is not None and hasattr(model, "adapter") and hasattr(model, "backbone"):
            return model
    return None


def _first_pipeline(reward: CompositeReward) -> Any:
    for component in reward.unique_rewards:
        pipe = getattr(component, "pipeline", None)
        if pipe is not None:
            return pipe
    return None


def build_scoring(
    reward: Any,
    pipeline: Any = None,
    *,
    name: str = "dinalrm",
    backbone: str | None = None,
    height: int | None = None,
    width: int | None = None,
    **options: Any,
) -> LatentScoring:
    """A :class:`LatentScoring` from whatever the user has.

    Args:
        reward: a reward model id / folder / tiny id, a ``LatentRewardModel``, a latent reward or a
            :class:`CompositeReward` (see :func:`~dinalrm_align.rewards.composition.as_composite`).
        pipeline: the reward model's pipeline (SD3.5, FLUX.1 or Z-Image; it may be the policy's own), or a tiny
            id / hub id / folder to load it from. Its text stack encodes prompts (through private copies of
            its tokenizers, see :func:`private_tokenizers`), its VAE factor unpacks FLUX.
        name: key of the reward in the returned details (single rewards only).
        backbone: family of the latents (``sd3``, ``flux``, ``zimage``); default: the reward model's.
        height, width: image size in pixels (packed FLUX latents only).
        options: ``DiNaLatentReward`` settings (``u``, ``normalization``, ``seeding``, ``n_noise``,
            ``max_sequence_length``) and, when loading by id, ``torch_dtype`` / ``device``.
    """
    from dinalrm_align.backbones.registry import adapter_for, get_adapter

    if isinstance(pipeline, str) or hasattr(pipeline, "__fspath__"):
        pipeline = resolve_pipeline(pipeline, torch_dtype=options.get("torch_dtype"), device=options.get("device"))
    elif pipeline is not None:
        pipeline = private_tokenizers(pipeline)  # the trainer keeps encoding with the original in its own thread
    composite = as_composite(reward, pipeline, name=name, **options)
    pipeline = pipeline if pipeline is not None else _first_pipeline(composite)
    model = _first_model(composite)
    if backbone is not None:
        adapter = get_adapter(backbone)
    elif model is not None:
        adapter = model.adapter
    elif pipeline is not None:
        adapter = adapter_for(pipeline)
    else:
        adapter = None
    return LatentScoring(composite, adapter, pipeline, height=height, width=width)


def to_float32_numpy(details: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``{name: (B,) tensor}`` -> ``{name: (B,) float32 numpy array}`` (detached, on the CPU)."""
    from dinalrm_align.rewards.flow_grpo import to_numpy

    return to_numpy(details)
