"""DanceGRPO (FastVideo / torchrun family): a reward call for its sampling loop, on latents.

DanceGRPO has no reward abstraction: the reward model is held by the training script and called inside its
sampling function. Facts of its image scripts that shape this adapter:

* samples are generated in small chunks (one sample at a time in the FLUX script, ``train.batch_size`` in
  the SD3.5 script); after each chunk the image is decoded with the VAE and scored, and the chunk's scores,
  a ``(b,)`` tensor on the training device, are appended to a list that is ``torch.cat``-ed and cast to
  float32 to give the ``(B,)`` rewards of the step (then gathered across ranks and normalised per group of
  ``num_generations`` samples);
* the FLUX script keeps latents *packed*, ``(b, N, 64)``, and scores the clean-sample prediction of the last
  step; it unpacks with the image size ``h``, ``w`` before decoding. The SD3.5 script's sampler returns the
  per-step latents as a list, so the final latents are ``latents[-1]`` of that list (``[:, -1]`` once stacked);
* prompts are captions (strings) next to precomputed text embeddings: the FLUX script reads T5 embeddings
  of 512 tokens, the SD3.5 script encodes 256 tokens. DiNa-LRM was trained with 128-token text, so by
  default pass the captions and let the reward encode them with its own pipeline (cached per caption);
  passing the trainer's embeddings skips that encode but scores with a text length the model never saw.

:class:`DanceGRPOLatentReward` replaces the decode + reward block:
``rewards = reward_fn(latents, captions, height=h, width=w)`` -> ``(b,)`` float32 on the latents' device,
without gradients (GRPO needs none); :meth:`DanceGRPOLatentReward.differentiable` keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dinalrm_align.integrations.common import LatentScoring, build_scoring
from dinalrm_align.rewards.composition import AVG

__all__ = ["DanceGRPOLatentReward", "dance_grpo_latent_reward_fn"]


class DanceGRPOLatentReward:
    """``fn(latents, captions, *, encoder_hidden_states=None, pooled_prompt_embeds=None, height=None,
    width=None, metadata=None) -> (b,)`` float32 rewards on ``latents.device``.

    ``latents``: the chunk's final latents, ``(b, C, h, w)`` or packed FLUX ``(b, N, 64)`` (then ``height`` and
    ``width``, in pixels, are needed unless given at construction); ``captions``: b strings (a single string
    for ``b == 1``); ``encoder_hidden_states`` / ``pooled_prompt_embeds``: optional, the family's embeddings
    to score with instead of re-encoding the captions (see the module notes on text length).
    """

    def __init__(self, scoring: LatentScoring) -> None:
        self.scoring = scoring

    def _avg(
        self,
        latents: Any,
        captions: Any,
        *,
        differentiable: bool,
        encoder_hidden_states: Any,
        pooled_prompt_embeds: torch.Tensor | None,
        height: int | None,
        width: int | None,
        metadata: Sequence[Any] | None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None and pooled_prompt_embeds is not None:
            raise ValueError("pooled_prompt_embeds was given without encoder_hidden_states")
        details = self.scoring.details(
            latents, captions, metadata, prompt_embeds=encoder_hidden_states,
            pooled_prompt_embeds=pooled_prompt_embeds, differentiable=differentiable, height=height, width=width,
        )
        return details[AVG].to(device=latents.device, dtype=torch.float32)

    def __call__(
        self,
        latents: torch.Tensor,
        captions: Sequence[str] | str,
        *,
        encoder_hidden_states: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        metadata: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """``(b,)`` float32 rewards (no graph) on ``latents.device``."""
        with torch.no_grad():
            return self._avg(
                latents, captions, differentiable=False, encoder_hidden_states=encoder_hidden_states,
                pooled_prompt_embeds=pooled_prompt_embeds, height=height, width=width, metadata=metadata,
            )

    def differentiable(
        self,
        latents: torch.Tensor,
        captions: Sequence[str] | str,
        *,
        encoder_hidden_states: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        metadata: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """Like the call, with gradients w.r.t. ``latents`` (reward back-propagation variants)."""
        return self._avg(
            latents, captions, differentiable=True, encoder_hidden_states=encoder_hidden_states,
            pooled_prompt_embeds=pooled_prompt_embeds, height=height, width=width, metadata=metadata,
        )

    def set_step(self, step: int) -> None:
        """Mix ``step`` into the reward-noise seeds (call once per training step for fresh, replayable noise)."""
        self.scoring.set_step(step)


def dance_grpo_latent_reward_fn(
    reward: Any,
    pipeline: Any = None,
    *,
    name: str = "dinalrm",
    backbone: str | None = None,
    height: int | None = None,
    width: int | None = None,
    **options: Any,
) -> DanceGRPOLatentReward:
    """The reward for DanceGRPO's sampling loop.

    Args:
        reward: reward model id / folder / tiny id, ``LatentRewardModel``, latent reward or ``CompositeReward``.
        pipeline: the reward model's pipeline (FLUX.1 or SD3.5; it encodes the captions and gives the VAE factor
            used to unpack FLUX latents). DanceGRPO's FLUX script loads no pipeline: load the family's pipeline
            (text encoders + VAE config) once for the reward, e.g. by hub id.
        name: key of the reward inside a composite.
        backbone: family of the latents when it is not the reward model's.
        height, width: default image size in pixels for packed FLUX latents (``args.h``, ``args.w``).
        options: ``DiNaLatentReward`` settings (``u``, ``normalization``, ``seeding``, ``n_noise``,
            ``max_sequence_length``) and ``torch_dtype`` / ``device`` when loading by id.
    """
    scoring = build_scoring(reward, pipeline, name=name, backbone=backbone, height=height, width=width, **options)
    return DanceGRPOLatentReward(scoring)
