"""Score a batch of preference pairs at one shared noise draw per pair (the training forward).

:class:`PairScorer` wraps a :class:`~dinalrm_align.reward_model.model.LatentRewardModel` in an
``nn.Module`` whose ``forward`` is the whole pair computation, so that DDP / DeepSpeed wrappers
(which hook ``forward``) see it. Chosen and rejected latents of pair ``i`` are noised with the same
``noise[i]`` at the same ``sigma[i]`` and scored in ONE batched pass of ``2B`` rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dinalrm_align.backbones.conditioning import TextConditioning
from dinalrm_align.reward_model.noise import add_noise


def noisy_pair(
    chosen: torch.Tensor, rejected: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 - sigma) x + sigma * noise`` for both sides with the SAME ``noise`` (B, C, H, W) and ``sigma`` (B,)."""
    if chosen.shape != rejected.shape or noise.shape != chosen.shape:
        raise ValueError(
            f"chosen {tuple(chosen.shape)}, rejected {tuple(rejected.shape)} and noise {tuple(noise.shape)} "
            "must have the same shape (one bucket per batch)"
        )
    if sigma.reshape(-1).shape[0] != chosen.shape[0]:
        raise ValueError(f"sigma must have one value per pair ({chosen.shape[0]}), got {tuple(sigma.shape)}")
    sigma = sigma.reshape(-1).to(chosen.device)
    return add_noise(chosen, noise, sigma), add_noise(rejected, noise, sigma)


class PairScorer(nn.Module):
    """``forward(chosen, rejected, sigma, noise, cond) -> (r_pos, r_neg)``, each (B,).

    ``sigma`` must already be table sigmas (``rm.sigma_for(u)[0]``). With ``add_noise`` false in the
    model config the clean latents are scored at the sigma's timestep (the reference option).
    """

    def __init__(self, reward_model: Any) -> None:
        super().__init__()
        self.reward_model = reward_model

    def forward(
        self,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        sigma: torch.Tensor,
        noise: torch.Tensor,
        cond: TextConditioning,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rm = self.reward_model
        if rm.config.add_noise:
            x_pos, x_neg = noisy_pair(chosen, rejected, sigma, noise)
        else:
            x_pos, x_neg = chosen, rejected
        b = chosen.shape[0]
        sigma = sigma.reshape(-1).to(chosen.device)
        raw = rm.forward_noisy(torch.cat([x_pos, x_neg]), torch.cat([sigma, sigma]), prompt_embeds=cond.repeat(2))
        return raw[:b], raw[b:]
