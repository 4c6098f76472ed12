"""Pixel bridge: decoded images -> VAE latents -> latent reward (the slower path).

For trainers that only hand over pixels (Flow-GRPO's ``multi_score``, trl DDPO/AlignProp,
Flow-Factory image rewards). Each image is VAE-encoded with the reward pipeline's own VAE (SD3.5,
FLUX.1 or Z-Image; the posterior *mean*, so the same image always gives the same latents, with the
family's normalisation ``(z - shift) * scale``) by
:func:`dinalrm_align.reward_model.images.encode_images`, one image per VAE call. Prefer the
latent-native entry points when the trainer has the latents: they skip the decode *and* this
encode (and the encode-decode round trip is not exactly the identity).

Accepted images: float tensors (B, 3, H, W) in [0, 1] (any resolution, e.g. SD1 images from
DDPO), uint8 arrays/tensors (B, H, W, 3), PIL images or a list of them. Sides that are not
multiples of ``vae_factor * patch_size`` are centre-cropped. All images of one call must give the
same latent size.
"""

from __future__ import annotations

from typing import Any

import torch

from dinalrm_align.reward_model.images import encode_images


def images_to_latents(
    images: Any,
    pipeline: Any,
    *,
    differentiable: bool = False,
) -> torch.Tensor:
    """VAE-encode ``images`` into normalised, unpacked latents (B, 16, h, w) float32 on the VAE's device
    (posterior mean: deterministic).

    With ``differentiable=True`` gradients flow from the latents back to float image tensors
    (AlignProp-style reward back-propagation through pixels).
    """
    if pipeline is None or getattr(pipeline, "vae", None) is None:
        raise ValueError("the pixel bridge needs the reward model's pipeline with a VAE (pipeline=...)")
    latents = encode_images(pipeline, images, sample_posterior=False, differentiable=differentiable)
    shapes = sorted({tuple(z.shape) for z in latents})
    if len(shapes) > 1:
        raise ValueError(f"images of one call must have the same size; they give latents of shapes {shapes}")
    return torch.stack(latents)


class PixelBridge:
    """Wraps a latent reward (or composite) so it can be called with images and prompts.

    ``bridge(images, prompts=..., metadata=...)`` returns what the wrapped reward returns: a (B,)
    tensor for a latent reward, a ``{name: scores, "avg": ...}`` dict for a composite. Scores are
    on the VAE's device.
    """

    def __init__(self, reward: Any, pipeline: Any) -> None:
        if getattr(pipeline, "vae", None) is None:
            raise ValueError("PixelBridge needs the reward model's pipeline with a VAE")
        self.reward = reward
        self.pipeline = pipeline

    def latents(self, images: Any, *, differentiable: bool = False) -> torch.Tensor:
        return images_to_latents(images, self.pipeline, differentiable=differentiable)

    def __call__(self, images: Any, *, prompts: Any = None, metadata: Any = None, **inputs: Any) -> Any:
        """No-grad scores of ``images`` (see the module docstring for accepted formats)."""
        return self.reward(latents=self.latents(images), prompts=prompts, metadata=metadata, **inputs)

    def score_differentiable(
        self, images: torch.Tensor, *, prompts: Any = None, metadata: Any = None, **inputs: Any
    ) -> Any:
        """Scores with gradients w.r.t. float image tensors (the wrapped reward must be differentiable)."""
        latents = self.latents(images, differentiable=True)
        if hasattr(self.reward, "score_differentiable"):
            return self.reward.score_differentiable(
                latents=latents, prompts=prompts, metadata=metadata, **inputs
            )
        if hasattr(self.reward, "score_differentiable_details"):
            return self.reward.score_differentiable_details(
                latents=latents, prompts=prompts, metadata=metadata, **inputs
            )
        raise TypeError(f"{type(self.reward).__name__} is not differentiable (a remote reward never is)")
