"""Pure loss functions for ReFL and GRPO (float32 math, scalar losses unless stated)."""

from __future__ import annotations

import torch

__all__ = [
    "flow_matching_loss",
    "gaussian_mean_kl",
    "mix_regularized",
    "ppo_clip_loss",
    "refl_loss",
]


def refl_loss(normalized_reward: torch.Tensor) -> torch.Tensor:
    """ReFL loss ``-mean(reward)`` for a differentiable ``(B,)`` (or any-shape) reward.

    The released DiNa-LRM recipe minimises ``mean(2 - (raw + 12) / 10)``; that differs from
    ``-mean((raw + offset) / 10)`` only by a constant, so the gradient is identical for any offset.
    """
    if not isinstance(normalized_reward, torch.Tensor) or normalized_reward.numel() == 0:
        raise ValueError("normalized_reward must be a non-empty tensor")
    return -normalized_reward.float().mean()


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    *,
    adv_clip_max: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip policy loss on one step's ``(B,)`` log-probs (Flow-GRPO form).

    ``ratio = exp(log_prob - old_log_prob)``; with ``A`` the advantages (clamped to
    ``+-adv_clip_max`` if given)::

        loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range)))

    Returns ``(loss, info)``; ``info`` holds detached float32 scalars: ``policy_loss``,
    ``approx_kl = 0.5 * mean((log_prob - old_log_prob)^2)``, ``clipfrac = mean(|ratio - 1| > clip_range)``,
    ``clipfrac_gt_one``, ``clipfrac_lt_one``, ``ratio_mean``, ``ratio_max``, ``ratio_min``.
    """
    if log_prob.shape != old_log_prob.shape or log_prob.shape != advantages.shape:
        raise ValueError(
            f"log_prob, old_log_prob and advantages must have the same shape, got {tuple(log_prob.shape)}, "
            f"{tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    if log_prob.numel() == 0:
        raise ValueError("ppo_clip_loss got empty tensors")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    adv = advantages.float()
    if adv_clip_max is not None:
        if not adv_clip_max > 0:
            raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
        adv = adv.clamp(-adv_clip_max, adv_clip_max)
    diff = log_prob.float() - old_log_prob.float()
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        r = ratio.detach()
        info = {
            "policy_loss": loss.detach(),
            "approx_kl": 0.5 * (diff.detach() ** 2).mean(),
            "clipfrac": ((r - 1.0).abs() > clip_range).float().mean(),
            "clipfrac_gt_one": (r - 1.0 > clip_range).float().mean(),
            "clipfrac_lt_one": (1.0 - r > clip_range).float().mean(),
            "ratio_mean": r.mean(),
            "ratio_max": r.max(),
            "ratio_min": r.min(),
        }
    return loss, info


def gaussian_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Closed-form KL between ``N(mean, std^2)`` and ``N(ref_mean, std^2)`` per element, averaged -> ``(B,)``.

    ``||mean - ref_mean||^2 / (2 std^2)`` averaged over non-batch dims (Flow-GRPO). ``std`` is a float,
    a ``(B,)`` tensor (e.g. ``StepOutput.std``) or anything broadcastable to ``mean``; it must be > 0
    (deterministic steps have no KL: skip them).
    """
    if mean.shape != ref_mean.shape or mean.ndim < 1:
        raise ValueError(f"mean and ref_mean must have the same batched shape, got {tuple(mean.shape)}, {tuple(ref_mean.shape)}")
    std_t = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if std_t.ndim == 1 and std_t.shape[0] == mean.shape[0] and mean.ndim > 1:
        std_t = std_t.reshape(-1, *([1] * (mean.ndim - 1)))
    sq = (mean.float() - ref_mean.float()) ** 2 / (2 * std_t**2)
    return sq.mean(dim=tuple(range(1, sq.ndim))) if sq.ndim > 1 else sq


def flow_matching_loss(
    v_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Flow-matching MSE of ``v_pred`` to the target ``noise - x0`` (float32).

    ``reduction="mean"``: scalar; ``"none"``: ``(B,)`` per-sample mean over non-batch dims.
    """
    if not (v_pred.shape == noise.shape == x0.shape):
        raise ValueError(
            f"v_pred, noise and x0 must have the same shape, got {tuple(v_pred.shape)}, {tuple(noise.shape)}, {tuple(x0.shape)}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    err = (v_pred.float() - (noise.float() - x0.float())) ** 2
    if reduction == "mean":
        return err.mean()
    return err.mean(dim=tuple(range(1, err.ndim))) if err.ndim > 1 else err


def mix_regularized(l_main: torch.Tensor, l_reg: torch.Tensor | float, lam: float) -> torch.Tensor:
    """``(l_main + lam * l_reg) / (1 + lam)`` (the DiNa-LRM ReFL + pretrain-loss mix); ``lam >= 0``."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return (l_main + lam * l_reg) / (1.0 + lam)
