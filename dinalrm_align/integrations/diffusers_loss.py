"""The latent reward as an extra loss term in diffusers' flow-matching training scripts.

diffusers' DreamBooth / LoRA scripts for SD3 (``train_dreambooth_lora_sd3.py``), FLUX and friends train
with the flow-matching loss on VAE latents normalised as ``(z - shift_factor) * scaling_factor``: the
noisy input is ``z_t = (1 - sigma) * x0 + sigma * noise``, the target is ``noise - x0`` and the transformer
predicts the velocity ``v``. One transformer call therefore also gives a clean-sample estimate,

    x0_hat = z_t - sigma * v

which is in the reward's latent space already: DiNa-LRM can score it with gradients flowing back through
``v`` into the trained weights, with no VAE decode. :func:`reward_regularised_loss` returns

    loss = fm_loss - reward_weight * mean(reward(x0_hat))

plus its parts. ``max_sigma`` restricts the reward term to samples at low noise, where ``x0_hat`` is a sharp
estimate (at high noise it is a blurry mean the reward was not trained on); those samples are the only ones
scored, so it also saves reward compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dinalrm_align.rewards import protocol as P

__all__ = ["RewardLoss", "predicted_x0", "reward_regularised_loss", "sigma_per_sample"]


@dataclass
class RewardLoss:
    """Parts of :func:`reward_regularised_loss` (all keep their graphs).

    Attributes:
        loss: scalar, ``fm_loss - reward_weight * reward.mean()`` (the reward term is 0 when no sample is scored).
        fm_loss: scalar flow-matching loss, ``mean_b mean_chw(weighting * (v - target)^2)``.
        reward: ``(K,)`` float32 rewards of the scored samples (K <= B).
        scored: ``(K,)`` int64 indices of the scored samples in the batch.
        x0_hat: ``(B, C, h, w)`` clean-sample estimates ``z_t - sigma * v``.
    """

    loss: torch.Tensor
    fm_loss: torch.Tensor
    reward: torch.Tensor
    scored: torch.Tensor
    x0_hat: torch.Tensor


def sigma_per_sample(sigmas: float | torch.Tensor, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``sigmas`` as a float32 ``(B,)`` tensor: a float, a 0-d tensor, ``(B,)`` or the scripts' ``(B, 1, 1, 1)``."""
    if isinstance(sigmas, bool) or not isinstance(sigmas, (int, float, torch.Tensor)):
        raise ValueError(f"sigmas must be a float or a tensor, got {type(sigmas).__name__}")
    s = torch.as_tensor(sigmas, dtype=torch.float32, device=device)
    if s.ndim == 0:
        s = s.expand(batch_size)
    elif s.shape[0] != batch_size or any(d != 1 for d in s.shape[1:]):
        raise ValueError(f"sigmas must be a scalar, ({batch_size},) or ({batch_size}, 1, ...), got {tuple(s.shape)}")
    s = s.reshape(batch_size)
    if not bool(((s >= 0) & (s <= 1)).all()):
        raise ValueError("sigmas must lie in [0, 1] (flow-matching noise levels, not timesteps 0..1000)")
    return s


def predicted_x0(
    noisy: torch.Tensor, model_pred: torch.Tensor, sigmas: float | torch.Tensor, *, precondition_outputs: bool = False
) -> torch.Tensor:
    """Clean-sample estimate ``(B, C, h, w)`` from one flow-matching prediction.

    ``noisy`` ``z_t`` and ``model_pred`` ``v`` are ``(B, C, h, w)`` (unpacked); ``sigmas`` the per-sample noise
    levels. With ``precondition_outputs`` (the SD3 script's option) the prediction already is ``x0_hat``.
    """
    if not isinstance(noisy, torch.Tensor) or noisy.ndim != 4:
        raise ValueError(f"noisy latents must be a (B, C, h, w) tensor, got {getattr(noisy, 'shape', type(noisy))}")
    if not isinstance(model_pred, torch.Tensor) or model_pred.shape != noisy.shape:
        raise ValueError(
            f"model_pred must have the noisy latents' shape {tuple(noisy.shape)}, got "
            f"{tuple(model_pred.shape) if isinstance(model_pred, torch.Tensor) else type(model_pred).__name__}"
            " (FLUX scripts predict packed tokens: unpack the prediction first)"
        )
    if precondition_outputs:
        return model_pred
    s = sigma_per_sample(sigmas, noisy.shape[0], noisy.device).to(model_pred.dtype)
    return noisy - s.view(-1, 1, 1, 1) * model_pred


def _score(reward: Any, x0_hat: torch.Tensor, **inputs: Any) -> torch.Tensor:
    if hasattr(reward, "score_differentiable_details"):  # a CompositeReward
        return reward.score_differentiable_details(latents=x0_hat, **inputs)["avg"]
    if isinstance(reward, P.DifferentiableLatentReward):
        return reward.score_differentiable(latents=x0_hat, **inputs)
    raise ValueError(
        f"{type(reward).__name__} is not a differentiable latent reward (needs score_differentiable; a remote "
        "reward never is): pass a DiNaLatentReward or a CompositeReward of differentiable rewards"
    )


def reward_regularised_loss(
    reward: Any,
    *,
    noisy: torch.Tensor,
    model_pred: torch.Tensor,
    target: torch.Tensor,
    sigmas: float | torch.Tensor,
    reward_weight: float,
    prompts: Sequence[str] | None = None,
    prompt_embeds: Any = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    weighting: torch.Tensor | None = None,
    max_sigma: float | None = None,
    precondition_outputs: bool = False,
) -> RewardLoss:
    """Flow-matching loss minus the weighted latent reward of ``x0_hat`` (see the module docstring).

    Args:
        reward: a differentiable latent reward (``DiNaLatentReward``) or a ``CompositeReward`` of them.
        noisy: ``z_t`` ``(B, C, h, w)``; model_pred: the velocity ``(B, C, h, w)``; target: ``noise - x0``
            (or ``x0`` with ``precondition_outputs``), same shape.
        sigmas: per-sample noise levels (float, ``(B,)`` or ``(B, 1, 1, 1)``).
        reward_weight: lambda >= 0 (0 gives the plain flow-matching loss and scores nothing).
        prompts / prompt_embeds / pooled_prompt_embeds: the reward's text (prompts are re-encoded at the
            reward's length, 128 tokens, with its pipeline; embeddings are used as they are).
        weighting: optional loss weighting broadcastable to ``(B, C, h, w)`` (e.g. ``compute_loss_weighting_for_sd3``).
        max_sigma: score only samples with ``sigma <= max_sigma`` (``None``: all).
        precondition_outputs: the prediction already is ``x0_hat`` (SD3 script option).
    """
    if isinstance(reward_weight, bool) or not isinstance(reward_weight, (int, float)) or not reward_weight >= 0:
        raise ValueError(f"reward_weight must be a number >= 0, got {reward_weight!r}")
    if max_sigma is not None and not 0 <= max_sigma <= 1:
        raise ValueError(f"max_sigma must lie in [0, 1], got {max_sigma!r}")
    x0_hat = predicted_x0(noisy, model_pred, sigmas, precondition_outputs=precondition_outputs)
    if not isinstance(target, torch.Tensor) or target.shape != model_pred.shape:
        raise ValueError(f"target must have model_pred's shape {tuple(model_pred.shape)}")
    b = noisy.shape[0]
    err = (model_pred.float() - target.float()) ** 2
    if weighting is not None:
        err = weighting.float() * err
    fm_loss = err.reshape(b, -1).mean(dim=1).mean()
    s = sigma_per_sample(sigmas, b, noisy.device)
    keep = s <= max_sigma if max_sigma is not None else torch.ones(b, dtype=torch.bool, device=noisy.device)
    if reward_weight == 0:
        keep = torch.zeros_like(keep)
    scored = keep.nonzero().flatten()
    if scored.numel() == 0:
        empty = fm_loss.new_zeros(0)
        return RewardLoss(fm_loss, fm_loss, empty, scored, x0_hat)
    rows = scored.tolist()
    inputs: dict[str, Any] = {}
    if prompts is not None:
        inputs["prompts"] = [P.check_prompts(prompts, b)[i] for i in rows]
    if prompt_embeds is not None:
        inputs["prompt_embeds"] = _rows(prompt_embeds, rows, b)
        inputs["pooled_prompt_embeds"] = None if pooled_prompt_embeds is None else pooled_prompt_embeds[scored]
    if not inputs:
        raise ValueError("pass prompts (B strings) or prompt_embeds (+ pooled_prompt_embeds) for the reward")
    scores = _score(reward, x0_hat[scored], **inputs).float()
    loss = fm_loss - float(reward_weight) * scores.mean()
    return RewardLoss(loss, fm_loss, scores, scored, x0_hat)


def _rows(prompt_embeds: Any, rows: list[int], batch_size: int) -> Any:
    """Select samples of the family's text output (a (B, L, D) tensor, a list of (L_i, D) tensors, or a
    ``TextConditioning``)."""
    if isinstance(prompt_embeds, (list, tuple)):
        if len(prompt_embeds) != batch_size:
            raise ValueError(f"got {batch_size} latents but {len(prompt_embeds)} prompt embeddings")
        return [prompt_embeds[i] for i in rows]
    if len(prompt_embeds) != batch_size:
        raise ValueError(f"got {batch_size} latents but {len(prompt_embeds)} prompt embeddings")
    return prompt_embeds[rows]
