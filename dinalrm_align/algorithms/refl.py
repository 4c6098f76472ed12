"""ReFL on the one-step clean-latent prediction of an intermediate denoising step (the DiNa-LRM recipe).

Per rollout::

    z_0 ~ N(0, I)                                   (B, C, h, w)
    k ~ UniformInt[k_min, k_max]                     drawn once per rollout
    no grad: ODE steps 0..k-1 (CFG if rollout_cfg)   -> z_k at sigma_k
    v = policy(z_k, sigma_k, cond)                   WITH grad (conditional branch; CFG if cfg_train)
    x0_hat = z_k - sigma_k * v                       one-step clean-latent prediction
    loss = -normalize(reward(x0_hat, u=0.4))         gradient flows reward -> x0_hat -> v -> policy LoRA

``grad_steps_per_rollout = M > 1`` draws M distinct k, integrates the no-grad ODE once up to the largest and
branches one graded step (one micro-step each) off every z_k: the expensive sampling is shared. With
``fm_lambda > 0`` each micro-step also computes the flow-matching loss on a (latent, prompt) dataset batch
in the same policy forward and mixes ``(L_refl + lambda * L_fm) / (1 + lambda)`` (the fork's "pretrain loss").
With ``kl_beta > 0`` the loss adds ``kl_beta * mean ||v - v_ref||^2`` (``v_ref``: the LoRA-disabled policy).
The sampler, time convention and text stack are the policy backbone's (any supported family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from dinalrm_align.algorithms.policy import PolicyAlgorithm, PolicyContext
from dinalrm_align.trainer.config import TrainConfig
from dinalrm_align.trainer.sections import AlgorithmConfig

__all__ = ["ReFL", "ReFLConfig", "refl_reward"]


@dataclass
class ReFLConfig(AlgorithmConfig):
    """``algorithm`` section of a ReFL recipe.

    Attributes:
        k_min, k_max: range (inclusive) of the graded step index k in the ``sampling.num_steps`` schedule.
        rollout_cfg: classifier-free guidance (``sampling.guidance_scale``) in the no-grad rollout.
        cfg_train: the graded forward also uses CFG (default: the conditional branch alone, as the fork).
        detach_uncond: with ``cfg_train``, stop gradients through the unconditional branch (the fork does not).
        grad_steps_per_rollout: graded steps branched off one rollout (distinct k each).
        fm_lambda: weight of the flow-matching regulariser (0: off).
        fm_dataset: safetensors file from :func:`dinalrm_align.trainer.data.save_latent_dataset`.
        fm_batch_size: regulariser samples per micro-step (default: ``train.batch_size``).
        fm_sigma_sampling: noise levels of the regulariser: ``table_index`` (uniform index into the
            scheduler's 1000-entry training sigma table, as the fork), ``logit_normal`` (SD3 training) or
            ``uniform``.
        kl_beta: weight of a penalty that keeps the policy near its base: ``kl_beta * mean ||v - v_ref||^2``
            at the graded step, ``v_ref`` from the same transformer with its LoRA disabled (the KL between the
            two policies' Gaussian transitions is proportional to it); one extra no-grad forward. Needs
            ``model.finetune: lora``. Useful when the base is not a trained flow model (no data to
            regularise with) or no flow-matching dataset is at hand.
    """

    name: str = "refl"
    k_min: int = 30
    k_max: int = 39
    rollout_cfg: bool = True
    cfg_train: bool = False
    detach_uncond: bool = False
    grad_steps_per_rollout: int = 1
    fm_lambda: float = 0.0
    fm_dataset: str | None = None
    fm_batch_size: int | None = None
    fm_sigma_sampling: Literal["table_index", "logit_normal", "uniform"] = "table_index"
    kl_beta: float = 0.0

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
        if self.kl_beta < 0:
            raise ValueError(f"algorithm.kl_beta must be >= 0, got {self.kl_beta}")


def refl_reward(
    score: Callable[[torch.Tensor], torch.Tensor],
    latents_k: torch.Tensor,
    velocity: torch.Tensor,
    sigma_k: torch.Tensor | float,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    *,
    detach_x0: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ReFL loss of one graded step from its velocity.

    Args:
        score: ``x0_hat (B, C, h, w) -> raw reward (B,)`` (differentiable).
        latents_k: ``z_k`` (B, C, h, w), no grad.
        velocity: policy velocity at ``z_k`` (B, C, h, w), with grad.
        sigma_k: noise level of ``z_k`` (float, 0-d or (B,)).
        normalize: raw -> normalised reward.
        detach_x0: cut the graph at ``x0_hat`` (diagnostics; the loss then has no gradient).

    Returns:
        ``(loss, info)``: scalar loss ``-mean(normalised reward)``; ``info`` has detached (B,) ``reward_raw``
        / ``reward_norm`` and the ``x0_hat`` tensor.
    """
    from dinalrm_align.algorithms.losses import refl_loss
    from dinalrm_align.sampling.steps import predict_x0

    x0_hat = predict_x0(latents_k, velocity, sigma_k)
    if detach_x0:
        x0_hat = x0_hat.detach()
    raw = score(x0_hat.float())
    norm = normalize(raw)
    return refl_loss(norm), {"reward_raw": raw.detach().float(), "reward_norm": norm.detach().float(), "x0_hat": x0_hat}


class ReFL(PolicyAlgorithm):
    """ReFL with a latent reward model on ``x0_hat`` of a random late step (see the module docstring)."""

    name: ClassVar[str] = "refl"
    config_class: ClassVar[type[AlgorithmConfig]] = ReFLConfig
    config: ReFLConfig

    def __init__(self, config: ReFLConfig) -> None:
        super().__init__(config)
        self.generator = torch.Generator()  # per rank: noise, fm batches
        self.shared_generator = torch.Generator()  # same on every rank: the graded steps k
        self._fm: tuple[torch.Tensor, list[str]] | None = None
        self._fm_table: torch.Tensor | None = None

    @property
    def micro_steps_per_batch(self) -> int:
        return self.config.grad_steps_per_rollout

    def uses_sampling_cfg(self, recipe: TrainConfig) -> bool:
        return recipe.sampling.guidance_scale > 1.0 and (self.config.rollout_cfg or self.config.cfg_train)

    def validate(self, recipe: TrainConfig, world_size: int) -> None:
        if self.config.kl_beta > 0 and recipe.model.finetune != "lora":
            raise ValueError("algorithm.kl_beta > 0 needs a LoRA policy (model.finetune: lora): the reference is the "
                             "policy with its LoRA disabled")
        n = recipe.sampling.num_steps
        if self.config.k_max >= n:
            raise ValueError(f"algorithm.k_max {self.config.k_max} must be < sampling.num_steps {n} (k indexes the schedule)")
        if self.config.fm_lambda > 0:
            from pathlib import Path

            if not Path(str(self.config.fm_dataset)).is_file():
                raise FileNotFoundError(f"flow-matching dataset not found: {self.config.fm_dataset} (algorithm.fm_dataset)")

    def setup_algorithm(self, ctx: PolicyContext) -> None:
        from dinalrm_align.reward_model.noise import sigma_table

        self.generator.manual_seed(ctx.config.seed + 1_000_003 * (ctx.process_index + 1))
        # every rank must run the same number of transformer forwards (ZeRO-3 gathers weights per forward)
        self.shared_generator.manual_seed(ctx.config.seed + 7)
        if self.config.fm_lambda > 0:
            from dinalrm_align.trainer.data import load_latent_dataset

            latents, prompts = load_latent_dataset(str(self.config.fm_dataset))
            if tuple(latents.shape[1:]) != tuple(ctx.latent_shape):
                raise ValueError(
                    f"fm_dataset latents have shape {tuple(latents.shape[1:])}, the policy samples "
                    f"{tuple(ctx.latent_shape)} at sampling.resolution {ctx.config.sampling.resolution}"
                )
            self._fm = (latents, prompts)
            self._fm_table = sigma_table(dict(ctx.pipeline.scheduler.config))[0]

    # ------------------------------------------------------------------ randomness (CPU, resumable)
    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)

    def _draw_ks(self) -> list[int]:
        lo, hi = self.config.k_min, self.config.k_max
        perm = torch.randperm(hi - lo + 1, generator=self.shared_generator)[: self.config.grad_steps_per_rollout]
        return sorted(int(lo + i) for i in perm)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def _rollout(self, ctx: PolicyContext, cond: Any, ks: list[int]) -> list[torch.Tensor]:
        """No-grad ODE rollout from fresh noise; returns ``z_k`` (fp32) for every k in ``ks`` (ascending)."""
        from dinalrm_align.sampling.rollout import ode_rollout

        sigmas = ctx.schedule(ctx.config.sampling.num_steps)
        guidance = ctx.config.sampling.guidance_scale if self.config.rollout_cfg else 1.0
        denoiser = ctx.denoiser(ctx.transformer, guidance_scale=guidance)
        z = self._randn(len(cond), *ctx.latent_shape).to(ctx.device)
        out, start = [], 0
        with ctx.autocast():
            for k in ks:
                z = ode_rollout(denoiser, z, sigmas, cond, start=start, stop=k).float()
                out.append(z)
                start = k
        return out

    def _fm_batch(self, ctx: PolicyContext) -> tuple[Any, ...]:
        """Noised regulariser batch: ``(x_t, sigma (B,), noise, x0, cond)``."""
        assert self._fm is not None and self._fm_table is not None
        latents, prompts = self._fm
        n = self.config.fm_batch_size or ctx.config.train.batch_size
        idx = torch.randint(len(prompts), (n,), generator=self.generator)
        x0 = latents[idx]
        mode = self.config.fm_sigma_sampling
        if mode == "table_index":
            sigma = self._fm_table[torch.randint(len(self._fm_table), (n,), generator=self.generator)]
        elif mode == "uniform":
            sigma = torch.rand(n, generator=self.generator)
        else:
            sigma = torch.sigmoid(torch.randn(n, generator=self.generator))
        noise = torch.randn(x0.shape, generator=self.generator)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        cond = ctx.encode([prompts[int(i)] for i in idx])
        dev = ctx.device
        return x_t.to(dev), sigma.to(dev), noise.to(dev), x0.to(dev), cond

    def train_step(self, prompts: list[str]) -> dict[str, Any]:
        from dinalrm_align.algorithms.losses import flow_matching_loss, mix_regularized
        from dinalrm_align.backbones.conditioning import TextConditioning

        ctx = self.ctx
        assert ctx is not None
        cfg = ctx.config
        cond = ctx.encode(prompts)
        b = len(prompts)
        ks = self._draw_ks()
        z_ks = self._rollout(ctx, cond, ks)
        sigmas = ctx.schedule(cfg.sampling.num_steps)
        guidance = cfg.sampling.guidance_scale if self.config.cfg_train else 1.0
        denoiser = ctx.denoiser(ctx.model, guidance_scale=guidance, detach_uncond=self.config.detach_uncond)
        raws, norms, losses, fm_losses, refl_losses, kl_losses = [], [], [], [], [], []
        for k, z_k in zip(ks, z_ks):
            sigma_k = sigmas[k]
            rm_noise = self._randn(cfg.reward.n_noise, b, *ctx.reward_latent_shape).to(ctx.device)
            fm = self._fm_batch(ctx) if self.config.fm_lambda > 0 else None
            v_ref = None
            if self.config.kl_beta > 0:  # reference first: adapters are toggled before the graded forward
                with torch.no_grad(), ctx.reference_policy() as ref_model, ctx.autocast():
                    v_ref = ctx.denoiser(ref_model, guidance_scale=guidance)(z_k, sigma_k, cond).float()
            with ctx.accumulate():
                with ctx.autocast():
                    if fm is None:
                        v = denoiser(z_k, sigma_k, cond)
                    else:  # one policy forward for both losses
                        x_t, s_fm, noise_fm, x0_fm, cond_fm = fm
                        v_all = denoiser(torch.cat([z_k, x_t]), torch.cat([sigma_k.expand(b), s_fm]),
                                         TextConditioning.cat([cond, cond_fm]))
                        v, v_fm = v_all[:b], v_all[b:]

                    def score(x0: torch.Tensor, _noise: torch.Tensor = rm_noise) -> torch.Tensor:
                        return ctx.score_reward(x0, cond, prompts, noise=_noise)

                    loss, info = refl_reward(score, z_k, v, sigma_k, ctx.normalize_reward)
                    refl_losses.append(loss.detach())
                    if fm is not None:
                        l_fm = flow_matching_loss(v_fm, noise_fm, x0_fm)
                        fm_losses.append(l_fm.detach())
                        loss = mix_regularized(loss, l_fm, self.config.fm_lambda)
                    if v_ref is not None:
                        kl = (v.float() - v_ref).pow(2).mean()
                        kl_losses.append(kl.detach())
                        loss = loss + self.config.kl_beta * kl
                ctx.backward(loss)
            losses.append(loss.detach())
            raws.append(info["reward_raw"])
            norms.append(info["reward_norm"])
        metrics: dict[str, Any] = {
            "loss": torch.stack(losses).mean(),
            "reward_raw": torch.cat(raws),
            "reward_norm": torch.cat(norms),
            "k": float(sum(ks)) / len(ks),
            "sigma_k": sigmas[ks].mean(),
        }
        if fm_losses:
            metrics["loss_refl"] = torch.stack(refl_losses).mean()
            metrics["loss_fm"] = torch.stack(fm_losses).mean()
        if kl_losses:
            metrics["kl_loss"] = torch.stack(kl_losses).mean()
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "shared_generator": self.shared_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if "shared_generator" in state:
            self.shared_generator.set_state(state["shared_generator"])
