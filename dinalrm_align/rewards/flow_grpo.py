"""Flow-GRPO / DiffusionNFT adapters (the ``multi_score`` contract).

Flow-GRPO (and its forks DiffusionNFT, GRPO-Guard) build ``reward_fn = multi_score(device,
{name: weight})`` and call it from a thread pool as
``reward_fn(images, prompts, prompt_metadata, only_strict=True)``. It returns
``(score_details, {})`` where ``score_details`` holds one entry per reward plus ``"avg"`` (the
weighted sum); the trainer turns every entry into a tensor with ``torch.as_tensor(value,
device=...)``, gathers them across ranks, trains on ``"avg"`` and logs each key as
``reward_<key>``. :class:`FlowGRPOReward` returns exactly that, with every entry a
``numpy.ndarray`` of shape (B,) and dtype float32 (what ``torch.as_tensor`` and the numpy
statistics downstream expect).

``images`` there are float tensors (B, 3, H, W) in [0, 1] decoded by the policy's VAE; they are
re-encoded by the pixel bridge with the VAE of the reward model's family (SD3.5, FLUX.1 or Z-Image;
slower). Forks that keep the final latents (the upstream DiNa-LRM alignment fork, DiffusionNFT,
which stores clean latents) should call :class:`FlowGRPOLatentReward` instead: ``fn(latents,
prompt_embeds, pooled_prompt_embeds=None, metadata=None)``, same return value, no VAE at all.

Reward noise is seeded per sample (see :mod:`dinalrm_align.rewards.seeding`), never per rank;
``only_strict`` and ``ref_images`` are accepted for signature compatibility and ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dinalrm_align.rewards import protocol as P
from dinalrm_align.rewards.composition import CompositeReward, as_composite
from dinalrm_align.rewards.dinalrm import resolve_pipeline
from dinalrm_align.rewards.pixels import images_to_latents

ScoreDetails = dict[str, np.ndarray]


def to_numpy(details: Mapping[str, torch.Tensor]) -> ScoreDetails:
    """``{name: (B,) tensor}`` -> ``{name: (B,) float32 ndarray}`` (detached, on CPU)."""
    return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in details.items()}


class FlowGRPOReward:
    """``fn(images, prompts, metadata, only_strict=True) -> ({name: (B,) f32, ..., "avg": (B,) f32}, {})``.

    Args:
        reward: the composite to evaluate (see :func:`flow_grpo_reward` to build one).
        pipeline: the reward model's pipeline (SD3.5, FLUX.1 or Z-Image) whose VAE re-encodes the images.
    """

    def __init__(self, reward: CompositeReward, pipeline: Any) -> None:
        if getattr(pipeline, "vae", None) is None:
            raise ValueError(
                "the image-based Flow-GRPO reward needs the reward model's pipeline (its VAE re-encodes images)"
            )
        self.reward = reward
        self.pipeline = pipeline

    def __call__(
        self,
        images: Any,
        prompts: Sequence[str],
        metadata: Sequence[Any] | None = None,
        ref_images: Any = None,
        only_strict: bool = True,
    ) -> tuple[ScoreDetails, dict[str, Any]]:
        latents = images_to_latents(images, self.pipeline)
        prompts = list(prompts)
        details = self.reward(
            latents=latents, prompts=prompts, metadata=P.check_metadata(metadata, latents.shape[0])
        )
        return to_numpy(details), {}

    def as_scorer(self) -> Callable[..., tuple[np.ndarray, dict[str, Any]]]:
        """A single scorer ``fn(images, prompts, metadata) -> ((B,) float32 "avg", {})``.

        For mixing with Flow-GRPO's own rewards: Flow-GRPO builds its reward table inside ``multi_score``
        (a local variable, not a registry), so combine the two with
        :func:`dinalrm_align.integrations.flow_grpo.flow_grpo_latent_multi_score` instead.
        """

        def scorer(images: Any, prompts: Sequence[str], metadata: Sequence[Any] | None = None):
            details, _ = self(images, prompts, metadata)
            return details["avg"], {}

        return scorer

    def set_step(self, step: int) -> None:
        """Vary the reward noise per epoch (reproducibly); call once per epoch."""
        self.reward.set_step(step)


class FlowGRPOLatentReward:
    """``fn(latents, prompt_embeds, pooled_prompt_embeds=None, metadata=None) -> (details, {})``, no VAE.

    ``latents`` (B, 16, h, w) normalised and unpacked (the trajectory's last entry; FLUX's packed
    latents must be unpacked first); embeddings as the trainer computed them for the policy with the
    family's ``encode_prompt`` (SD3.5 / FLUX.1: a (B, L, D) tensor and pooled (B, P); Z-Image: the list of
    (L_i, D) tensors and ``None``; ``max_sequence_length`` should be 128, the reward's training length).
    ``prompts`` (keyword) are optional: they key the per-sample noise seeds (else the embeddings do) and
    let components that need text strings run.
    """

    def __init__(self, reward: CompositeReward) -> None:
        self.reward = reward

    def __call__(
        self,
        latents: torch.Tensor,
        prompt_embeds: Any,
        pooled_prompt_embeds: torch.Tensor | None = None,
        metadata: Sequence[Any] | None = None,
        *,
        prompts: Sequence[str] | None = None,
    ) -> tuple[ScoreDetails, dict[str, Any]]:
        details = self.reward(
            latents=latents,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            prompts=list(prompts) if prompts is not None else None,
            metadata=P.check_metadata(metadata, int(latents.shape[0])),
        )
        return to_numpy(details), {}

    def set_step(self, step: int) -> None:
        self.reward.set_step(step)


def flow_grpo_reward(reward: Any, pipeline: Any, *, name: str = "dinalrm", **kwargs: Any) -> FlowGRPOReward:
    """The ``multi_score``-compatible reward function on decoded images.

    Args:
        reward: a reward model id / folder, a ``LatentRewardModel``, a latent reward or a
            :class:`CompositeReward` (see :func:`~dinalrm_align.rewards.composition.as_composite`).
        pipeline: the reward model's pipeline (SD3.5, FLUX.1 or Z-Image: VAE for the images, text encoders
            for the prompts), or a tiny id / hub id / folder to load it from. It can be the policy's own.
        name: key of the reward in the returned dict (when ``reward`` is a single reward).
        kwargs: ``DiNaLatentReward`` options: ``u`` (0.4), ``normalization`` (``"display"``
            (raw+10)/10; ``"fork"`` (raw+12)/10 as the upstream fork; ``"raw"``), ``seeding``,
            ``n_noise``, ``max_sequence_length``, and ``torch_dtype``/``device`` when loading.
    """
    pipeline = resolve_pipeline(pipeline, torch_dtype=kwargs.get("torch_dtype"), device=kwargs.get("device"))
    return FlowGRPOReward(as_composite(reward, pipeline, name=name, **kwargs), pipeline)


def flow_grpo_latent_reward(
    reward: Any, pipeline: Any = None, *, name: str = "dinalrm", **kwargs: Any
) -> FlowGRPOLatentReward:
    """The latent-native variant ``fn(latents, prompt_embeds, pooled_prompt_embeds=None, metadata=None)``.

    Same arguments as :func:`flow_grpo_reward`; ``pipeline`` is only needed to load a model by id.
    """
    return FlowGRPOLatentReward(as_composite(reward, pipeline, name=name, **kwargs))


#: DiffusionNFT keeps Flow-GRPO's ``multi_score`` contract unchanged.
diffusion_nft_reward = flow_grpo_reward
diffusion_nft_latent_reward = flow_grpo_latent_reward
