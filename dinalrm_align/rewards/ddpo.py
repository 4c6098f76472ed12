"""trl ``DDPOTrainer`` / ``AlignPropTrainer`` reward function (``trl<0.24``, SD1.x pipelines).

trl calls ``reward_function(images, prompts, prompt_metadata)`` with

* ``images``: float tensor (B, 3, H, W) in [0, 1] on the trainer's device (the SD1 VAE's decode),
* ``prompts``: tuple of B strings, ``prompt_metadata``: tuple of B objects from ``prompt_fn``,

and expects ``(rewards, reward_metadata)``. DDPO does ``torch.as_tensor(rewards, device=...)``,
``torch.cat`` over sample batches and gathers, so ``rewards`` must be one-dimensional (B,).
AlignProp back-propagates ``10 - rewards.mean()``, so its rewards must carry gradients to the
images: use ``differentiable=True`` there.

The images come from an SD1 pipeline; the bridge VAE-encodes them with the **VAE of the reward
model's pipeline** (SD3.5, FLUX.1 or Z-Image; pixel bridge) and scores those latents.
``reward_metadata`` is a dict of every component's (B,) scores (for ``image_samples_hook`` logging).

With ``DDPOConfig(async_reward_computation=True)`` trl 0.23.1 calls the reward function in its thread
pool and then calls ``.result()`` on *both* returned values; build the function with
``async_results=True`` for that mode (it then returns two completed futures).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch

from dinalrm_align.rewards import protocol as P
from dinalrm_align.rewards.composition import AVG, CompositeReward, as_composite
from dinalrm_align.rewards.dinalrm import resolve_pipeline
from dinalrm_align.rewards.pixels import images_to_latents


class DDPORewardFunction:
    """``reward_fn(images, prompts, prompt_metadata) -> (rewards (B,) float32, {name: (B,)})``.

    Args:
        reward: the composite to evaluate (see :func:`ddpo_reward_fn`).
        pipeline: the reward model's pipeline (SD3.5, FLUX.1 or Z-Image) whose VAE encodes the images.
        differentiable: keep gradients from rewards to images (AlignProp); every component must
            then be differentiable.
        async_results: return ``(Future, Future)`` already completed with the two values, the
            convention of trl's ``DDPOTrainer`` with ``async_reward_computation=True``.
    """

    def __init__(
        self, reward: CompositeReward, pipeline: Any, *, differentiable: bool = False, async_results: bool = False
    ) -> None:
        if getattr(pipeline, "vae", None) is None:
            raise ValueError("the DDPO reward needs the reward model's pipeline (its VAE encodes the images)")
        if differentiable and not reward.differentiable:
            raise ValueError("differentiable=True needs differentiable components (a remote reward never is)")
        if differentiable and async_results:
            raise ValueError("async_results=True is for trl's DDPO thread pool; AlignProp needs differentiable=True alone")
        self.reward = reward
        self.pipeline = pipeline
        self.differentiable = differentiable
        self.async_results = async_results

    def __call__(
        self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any] | None = None
    ) -> tuple[Any, Any]:
        """``(rewards (B,) float32 on the images' device, {name: (B,) CPU scores})``, or two completed
        futures of them with ``async_results=True``."""
        rewards, details = self.score(images, prompts, prompt_metadata)
        if not self.async_results:
            return rewards, details
        return _done(rewards), _done(details)

    def score(
        self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The plain (synchronous) result: ``(rewards (B,), {name: (B,)})``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        latents = images_to_latents(images, self.pipeline, differentiable=self.differentiable)
        metadata = P.check_metadata(prompt_metadata, len(prompts))
        inputs = dict(latents=latents, prompts=prompts, metadata=metadata)
        if self.differentiable:
            details = self.reward.score_differentiable_details(**inputs)
        else:
            details = self.reward(**inputs)
        device = images.device if isinstance(images, torch.Tensor) else latents.device
        rewards = details[AVG].to(device)
        return rewards, {k: v.detach().cpu() for k, v in details.items()}

    def set_step(self, step: int) -> None:
        self.reward.set_step(step)


def ddpo_reward_fn(
    reward: Any,
    pipeline: Any,
    *,
    differentiable: bool = False,
    async_results: bool = False,
    name: str = "dinalrm",
    **kwargs: Any,
) -> DDPORewardFunction:
    """The trl DDPO / AlignProp ``reward_function`` for a DiNa-LRM (or composite) reward.

    ``reward`` and ``kwargs`` as in :func:`~dinalrm_align.rewards.flow_grpo.flow_grpo_reward`;
    ``pipeline`` is the **reward model's** pipeline (SD3.5, FLUX.1 or Z-Image; not trl's SD1 pipeline).
    Use ``u=0.1`` for images that did not come from the reward's family (the recommended level for clean
    encoded images). ``async_results=True`` for ``DDPOConfig(async_reward_computation=True)``.
    """
    pipeline = resolve_pipeline(pipeline, torch_dtype=kwargs.get("torch_dtype"), device=kwargs.get("device"))
    return DDPORewardFunction(
        as_composite(reward, pipeline, name=name, **kwargs), pipeline, differentiable=differentiable,
        async_results=async_results,
    )


def _done(value: Any) -> Future:
    """A completed ``concurrent.futures.Future`` holding ``value``."""
    future: Future = Future()
    future.set_result(value)
    return future


alignprop_reward_fn = ddpo_reward_fn
