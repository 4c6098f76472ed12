"""ReFL on the one-step clean-latent prediction of an intermediate denoising step (DiNa-LRM recipe).

Per rollout (``dina_lrm.md`` section 5.1)::

    z_0 ~ N(0, I)                                   (B, 16, h, w)
    k ~ UniformInt[k_min, k_max]                     drawn once per rollout
    no grad: Euler steps 0..k-1 with CFG             -> z_k at sigma_k
    v = policy(z_k, 1000 sigma_k, cond)              WITH grad, conditional branch only
    x0_hat = z_k - sigma_k * v                       one-step clean-latent prediction
    loss = -normalize(rm.score(x0_hat, u=0.4))       gradient flows rm -> x0_hat -> v -> policy LoRA

``grad_steps_per_rollout = M > 1`` draws M distinct k (once per rollout), integrates the no-grad
ODE once up to the largest and branches one graded step (one micro-step each) off every z_k: the
expensive no-grad sampling is shared. With ``fm_lambda > 0`` each micro-step also computes the
flow-matching loss on a (latent, prompt) dataset batch in the same policy forward and mixes
``(L_refl + lambda * L_fm) / (1 + lambda)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from dinalrm_align.algorithms.base import Algorithm, TrainContext
from dinalrm_align.trainer.config import AlgorithmConfig

if TYPE_CHECKING:  # pragma: no cover
    from dinalrm_align.trainer.config import TrainConfig


@dataclass
class ReFLConfig(AlgorithmConfig):
    """``algorithm`` section of a ReFL recipe.

    Attributes:
        k_min, k_max: range (inclusive) of the graded step index k in the ``sampling.num_steps`` schedule.
        rollout_cfg: classifier-free guidance (``sampling.guidance_scale``, negative prompt) in the
            no-grad rollout; the graded forward is always the conditional branch alone.
        grad_steps_per_rollout: graded steps branched off one rollout (distinct k each).
        fm_lambda: weight of the flow-matching regulariser (0: off).
        fm_dataset: safetensors file from :func:`dinalrm_align.trainer.data.save_latent_dataset`.
        fm_batch_size: regulariser samples per micro-step (default: ``train.batch_size``).
        fm_sigma_sampling: ``logit_normal`` (SD3 training) or ``uniform`` noise levels for the regulariser.
    """

    name: str = "refl"
    k_min: int = 30
    k_max: int = 39
    rollout_cfg: bool = True
    grad_steps_per_rollout: int = 1
    fm_lambda: float = 0.0
    fm_dataset: str | None = None
    fm_batch_size: int | None = None
    fm_sigma_sampling: Literal["logit_normal", "uniform"] = "logit_normal"

    def __post_init__(self) -> None:
        if not 0 <= self.k_min <= self.k_max:
            raise ValueError(f"need 0 <= algorithm.k_min <= algorithm.k_max, got {self.k_min}, {self.k_max}")
        if self.grad_steps_per_rollout < 1:
            raise ValueError(f"algorithm.grad_steps_per_rollout must be >= 1, got {self.grad_steps_per_rollout}")
        if self.grad_steps_per_rollout > self.k_max - self.k_min + 1:
            raise ValueError(
                f"algorithm.grad_steps_per_rollout {self.grad_steps_per_rollout} exceeds the number of distinct "
                f"k in [{self.k_min}, {self.k_max}]"
            )
        if self.fm_lambda < 0:
            raise ValueError(f"algorithm.fm_lambda must be >= 0, got {self.fm_lambda}")
        if self.fm_lambda > 0 and not self.fm_dataset:
            raise ValueError("algorithm.fm_lambda > 0 needs algorithm.fm_dataset (a latent dataset file)")
        if self.fm_batch_size is not None and self.fm_batch_size < 1:
            raise ValueError(f"algorithm.fm_batch_size must be >= 1, got {self.fm_batch_size}")


def refl_reward(
    reward_model: Any,
    latents_k: torch.Tensor,
    velocity: torch.Tensor,
    sigma_k: torch.Tensor | float,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    *,
    u: float = 0.4,
    n_noise: int = 1,
    noise: torch.Tensor | None = None,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    detach_x0: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ReFL loss of one graded step from its velocity.

    Args:
        latents_k: ``z_k`` (B, C, h, w), no grad.
        velocity: policy velocity at ``z_k`` (B, C, h, w), with grad.
        sigma_k: noise level of ``z_k`` (float, 0-d or (B,)).
        prompt_embeds, pooled_prompt_embeds: (B, L, D), (B, P).
        noise: reward re-noising noise (B, C, h, w) or (n_noise, B, C, h, w); None draws fresh noise.
        normalize: raw -> normalised reward (default ``reward_model.normalize``).
        detach_x0: cut the graph at ``x0_hat`` (diagnostics; the loss then has no gradient).

    Returns:
        ``(loss, info)``: scalar loss ``-mean(normalised reward)``; ``info`` has detached (B,)
        ``reward_raw`` / ``reward_norm`` and the ``x0_hat`` tensor.
    """
    from dinalrm_align.algorithms.losses import refl_loss
    from dinalrm_align.sampling.steps import predict_x0

    x0_hat = predict_x0(latents_k, velocity, sigma_k)
    if detach_x0:
        x0_hat = x0_hat.detach()
    raw = reward_model.score(
        x0_hat.float(),
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        u=u,
        noise=noise,
        n_noise=n_noise,
    )
    norm = normalize(raw) if normalize is not None else reward_model.normalize(raw)
    loss = refl_loss(norm)
    return loss, {"reward_raw": raw.detach().float(), "reward_norm": norm.detach().float(), "x0_hat": x0_hat}


class ReFL(Algorithm):
    """ReFL with a latent reward model on ``x0_hat`` of a random late step (see module docstring)."""

    name: ClassVar[str] = "refl"
    config_class: ClassVar[type[AlgorithmConfig]] = ReFLConfig
    config: ReFLConfig

    def __init__(self, config: ReFLConfig) -> None:
        super().__init__(config)
        self.generator = torch.Generator()
        self._sigmas: torch.Tensor | None = None
        self._fm: tuple[torch.Tensor, list[str]] | None = None

    @property
    def micro_steps_per_batch(self) -> int:
        return self.config.grad_steps_per_rollout

    def validate(self, config: TrainConfig) -> None:
        n = config.sampling.num_steps
        if self.config.k_max >= n:
            raise ValueError(
                f"algorithm.k_max {self.config.k_max} must be < sampling.num_steps {n} (k indexes the schedule)"
            )
        if self.config.fm_lambda > 0:
            from pathlib import Path

            if not Path(str(self.config.fm_dataset)).is_file():
                raise FileNotFoundError(f"flow-matching dataset not found: {self.config.fm_dataset} (algorithm.fm_dataset)")

    def setup(self, ctx: TrainContext) -> None:
        from dinalrm_align.sampling.schedule import inference_schedule

        self.validate(ctx.config)
        self.generator.manual_seed(ctx.config.seed + 1_000_003 * (ctx.process_index + 1))
        self._sigmas, _ = inference_schedule(ctx.pipeline.scheduler.config, ctx.config.sampling.num_steps, device=ctx.device)
        if self.config.fm_lambda > 0:
            from dinalrm_align.trainer.data import load_latent_dataset

            latents, prompts = load_latent_dataset(str(self.config.fm_dataset))
            if tuple(latents.shape[1:]) != tuple(ctx.latent_shape):
                raise ValueError(
                    f"fm_dataset latents have shape {tuple(latents.shape[1:])}, the policy samples "
                    f"{tuple(ctx.latent_shape)} at sampling.resolution {ctx.config.sampling.resolution}"
                )
            self._fm = (latents, prompts)

    # ------------------------------------------------------------------ randomness (CPU, resumable)
    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)

    def _draw_ks(self) -> list[int]:
        lo, hi = self.config.k_min, self.config.k_max
        perm = torch.randperm(hi - lo + 1, generator=self.generator)[: self.config.grad_steps_per_rollout]
        return sorted(int(lo + i) for i in perm)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def _rollout(self, ctx: TrainContext, pe: torch.Tensor, pooled: torch.Tensor, ks: list[int]) -> list[torch.Tensor]:
        """No-grad Euler rollout from fresh noise; returns ``z_k`` (fp32) for every k in ``ks`` (ascending)."""
        from dinalrm_align.sampling.rollout import ode_rollout

        assert self._sigmas is not None
        b = pe.shape[0]
        guidance = ctx.config.sampling.guidance_scale if self.config.rollout_cfg else 1.0
        neg_pe, neg_pooled = ctx.negative(b) if guidance > 1.0 else (None, None)
        z = self._randn(b, *ctx.latent_shape).to(ctx.device)
        out, start = [], 0
        with ctx.autocast():
            for k in ks:
                z = ode_rollout(
                    ctx.transformer, z, self._sigmas, pe, pooled,
                    guidance_scale=guidance,
                    negative_prompt_embeds=neg_pe,
                    negative_pooled_prompt_embeds=neg_pooled,
                    start=start,
                    stop=k,
                ).float()
                out.append(z)
                start = k
        return out

    def _fm_batch(self, ctx: TrainContext) -> tuple[torch.Tensor, ...]:
        """Noised regulariser batch: ``(x_t, sigma (B,), noise, x0, prompt_embeds, pooled)``."""
        assert self._fm is not None
        latents, prompts = self._fm
        n = self.config.fm_batch_size or ctx.config.train.batch_size
        idx = torch.randint(len(prompts), (n,), generator=self.generator)
        x0 = latents[idx]
        if self.config.fm_sigma_sampling == "uniform":
            sigma = torch.rand(n, generator=self.generator)
        else:
            sigma = torch.sigmoid(torch.randn(n, generator=self.generator))
        noise = torch.randn(x0.shape, generator=self.generator)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        pe, pooled = ctx.encode([prompts[int(i)] for i in idx])
        dev = ctx.device
        return x_t.to(dev), sigma.to(dev), noise.to(dev), x0.to(dev), pe, pooled

    def train_step(self, ctx: TrainContext, prompts: list[str]) -> dict[str, Any]:
        from dinalrm_align.algorithms.losses import flow_matching_loss, mix_regularized
        from dinalrm_align.sampling.rollout import predict_velocity

        assert self._sigmas is not None
        cfg = ctx.config
        pe, pooled = ctx.encode(prompts)
        b = len(prompts)
        ks = self._draw_ks()
        z_ks = self._rollout(ctx, pe, pooled, ks)
        raws, norms, losses, fm_losses, refl_losses = [], [], [], [], []
        for k, z_k in zip(ks, z_ks):
            sigma_k = self._sigmas[k]
            rm_noise = self._randn(cfg.reward.n_noise, b, *ctx.latent_shape).to(ctx.device)
            fm = self._fm_batch(ctx) if self.config.fm_lambda > 0 else None
            with ctx.accumulate(), ctx.autocast():
                if fm is None:
                    v = predict_velocity(ctx.model, z_k, sigma_k, pe, pooled, timestep_kind="sigma")
                else:  # one policy forward for both losses
                    x_t, s_fm, noise_fm, x0_fm, pe_fm, pooled_fm = fm
                    sig = torch.cat([sigma_k.expand(b), s_fm])
                    v_all = predict_velocity(
                        ctx.model, torch.cat([z_k, x_t]), sig, torch.cat([pe, pe_fm]), torch.cat([pooled, pooled_fm]),
                        timestep_kind="sigma",
                    )
                    v, v_fm = v_all[:b], v_all[b:]
                loss, info = refl_reward(
                    ctx.reward_model, z_k, v, sigma_k, pe, pooled,
                    u=cfg.reward.u, n_noise=cfg.reward.n_noise, noise=rm_noise, normalize=ctx.normalize_reward,
                )
                refl_losses.append(loss.detach())
                if fm is not None:
                    l_fm = flow_matching_loss(v_fm, noise_fm, x0_fm)
                    fm_losses.append(l_fm.detach())
                    loss = mix_regularized(loss, l_fm, self.config.fm_lambda)
                ctx.backward(loss)
            losses.append(loss.detach())
            raws.append(info["reward_raw"])
            norms.append(info["reward_norm"])
        metrics: dict[str, Any] = {
            "loss": torch.stack(losses).mean().item(),
            "reward_raw": torch.cat(raws).cpu(),
            "reward_norm": torch.cat(norms).cpu(),
            "k": float(sum(ks)) / len(ks),
            "sigma_k": float(self._sigmas[ks].mean()),
        }
        if fm_losses:
            metrics["loss_refl"] = torch.stack(refl_losses).mean().item()
            metrics["loss_fm"] = torch.stack(fm_losses).mean().item()
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
