"""Thin Flow-Factory / UniRL style wrappers around a latent reward.

* :class:`PointwiseLatentRewardModel` mirrors Flow-Factory's ``PointwiseRewardModel``: class
  attributes ``required_fields`` / ``use_tensor_inputs`` and a call
  ``model(prompt, image=None, ..., latents=None) -> RewardModelOutput(rewards=(B,))``. It declares
  ``("prompt", "latents")`` so a framework that supports a latent field hands latents over; given
  only ``image`` it falls back to the pixel bridge.
* :class:`LatentRewardBackend` mirrors UniRL's reward backend (``compute_rewards``,
  ``is_available``, ``preferred_input_kind``, ``offload`` / ``onload`` / ``dispose``) plus the
  optional differentiable capability ``compute_rewards_differentiable(images, prompts, records)``
  (pixels in [0, 1] -> (B,) with gradients) and a latent-native twin.

Both are registered in those frameworks by dotted import path, e.g.
``dinalrm_align.rewards.frameworks.PointwiseLatentRewardModel``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dinalrm_align.rewards import protocol as P
from dinalrm_align.rewards.composition import AVG, as_composite
from dinalrm_align.rewards.pixels import images_to_latents


@dataclass
class RewardModelOutput:
    """``rewards`` (B,) float32; ``extra`` holds every component's (B,) scores."""

    rewards: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class PointwiseLatentRewardModel:
    """Flow-Factory-style pointwise reward on latents (or images through the pixel bridge).

    Args:
        reward: reward model id / folder, ``LatentRewardModel``, latent reward or composite.
        pipeline: the reward model's pipeline (SD3.5, FLUX.1 or Z-Image: text encoders; VAE for ``image``
            inputs).
        kwargs: ``DiNaLatentReward`` options (``u``, ``normalization``, ``seeding`` ...).
    """

    required_fields: tuple[str, ...] = ("prompt", "latents")
    use_tensor_inputs: bool = True

    def __init__(self, reward: Any, pipeline: Any = None, **kwargs: Any) -> None:
        self.reward = as_composite(reward, pipeline, **kwargs)
        self.pipeline = pipeline

    @torch.no_grad()
    def __call__(
        self,
        prompt: Sequence[str],
        image: Any = None,
        video: Any = None,
        condition_images: Any = None,
        condition_videos: Any = None,
        *,
        latents: torch.Tensor | None = None,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        metadata: Sequence[Any] | None = None,
    ) -> RewardModelOutput:
        if video is not None or condition_images is not None or condition_videos is not None:
            raise ValueError(
                "DiNa-LRM scores single text-to-image samples: video/condition inputs are not supported"
            )
        if latents is None:
            if image is None:
                raise ValueError("pass latents (preferred) or image")
            latents = images_to_latents(image, self.pipeline)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        details = self.reward(
            latents=latents,
            prompts=prompts,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            metadata=P.check_metadata(metadata, int(latents.shape[0])),
        )
        return RewardModelOutput(rewards=details[AVG], extra={k: v for k, v in details.items() if k != AVG})


class LatentRewardBackend:
    """UniRL-style reward backend with an optional differentiable capability.

    ``compute_rewards(request)`` takes a mapping with ``prompts`` and either ``latents`` or
    ``images`` (optional ``records``) and returns ``{"rewards": [float] * B, "details": {...}}``.
    """

    preferred_input_kind: str = "latents"

    def __init__(self, reward: Any, pipeline: Any = None, **kwargs: Any) -> None:
        self.reward = as_composite(reward, pipeline, **kwargs)
        self.pipeline = pipeline
        self._device: torch.device | None = None

    def is_available(self) -> bool:
        return self.reward is not None

    def compute_rewards(self, request: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(request) - {
            "prompts",
            "latents",
            "images",
            "records",
            "prompt_embeds",
            "pooled_prompt_embeds",
        }
        if unknown:
            raise ValueError(f"unknown request keys {sorted(unknown)}")
        latents = request.get("latents")
        if latents is None:
            if request.get("images") is None:
                raise ValueError("request needs 'latents' (preferred) or 'images'")
            latents = images_to_latents(request["images"], self.pipeline)
        details = self.reward(
            latents=latents,
            prompts=request.get("prompts"),
            prompt_embeds=request.get("prompt_embeds"),
            pooled_prompt_embeds=request.get("pooled_prompt_embeds"),
            metadata=P.check_metadata(request.get("records"), int(latents.shape[0])),
        )
        return {
            "rewards": details[AVG].tolist(),
            "details": {k: v.tolist() for k, v in details.items() if k != AVG},
        }

    def compute_rewards_differentiable(
        self, images: torch.Tensor, prompts: Sequence[str], records: Sequence[Any] | None = None
    ) -> torch.Tensor:
        """(B,) rewards of images (B, 3, H, W) in [0, 1], differentiable w.r.t. ``images``."""
        latents = images_to_latents(images, self.pipeline, differentiable=True)
        return self.compute_rewards_differentiable_latents(latents, prompts, records)

    def compute_rewards_differentiable_latents(
        self, latents: torch.Tensor, prompts: Sequence[str], records: Sequence[Any] | None = None
    ) -> torch.Tensor:
        """(B,) rewards of latents, differentiable w.r.t. ``latents`` (no VAE in the graph)."""
        details = self.reward.score_differentiable_details(
            latents=latents, prompts=list(prompts), metadata=P.check_metadata(records, int(latents.shape[0]))
        )
        return details[AVG]

    # -------------------------------------------------------------- memory lifecycle
    def _models(self) -> list[torch.nn.Module]:
        return [
            r.model
            for r in self.reward.unique_rewards
            if hasattr(getattr(r, "model", None), "to_device_dtype")
        ]

    def offload(self) -> None:
        """Move the reward models to CPU (frees accelerator memory between reward phases)."""
        for model in self._models():
            self._device = model.device
            model.to_device_dtype("cpu", None)

    def onload(self) -> None:
        """Move the reward models back to where they were before :meth:`offload`."""
        if self._device is None:
            return
        for model in self._models():
            model.to_device_dtype(self._device, None)

    def dispose(self) -> None:
        """Drop the reward (it cannot be used afterwards)."""
        self.reward = None  # type: ignore[assignment]
