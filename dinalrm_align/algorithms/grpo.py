"""GRPO (Flow-GRPO style) with the latent reward on the final clean latents, on any supported backbone.

One *epoch*::

    rollouts   algorithm.num_batches_per_epoch batches of train.batch_size samples per process; each
               global batch holds m = batch_size * processes / group_size prompts x group_size samples
               (k-repeat sampler: a group may span processes). Stochastic steps ("sde" / "cps") with
               float32 log-probs inside the SDE window, ODE elsewhere; no grad.
    rewards    the latent reward on the final clean latents (no VAE decode, no grad, re-noising seeded per
               global sample index) + optional extra rewards (latents or decoded images), per component.
    advantages rewards gathered from all processes -> per-prompt (r - mean) / std (or global std), per
               component then weighted (DiNa + 0.2 x PickScore) or on the weighted sum; clipped; zero-std
               groups dropped.
    training   this process' kept samples (shuffled) in num_batches_per_epoch chunks; one ``train_step``
               per chunk, one micro-step per trained step (the SDE window): PPO-clip on
               exp(logp_new - logp_old) + kl_beta x closed-form KL to the LoRA-disabled policy.

Batching arithmetic (printed at start, see :class:`~dinalrm_align.algorithms.grpo_config.BatchingPlan`)::

    micro-steps per optimizer step = train.gradient_accumulation_steps x trained steps per sample
    optimizer steps per epoch      = num_batches_per_epoch / train.gradient_accumulation_steps
    samples per epoch              = num_batches_per_epoch x batch_size x processes

With one optimizer step per epoch every ratio is exactly 1 (pure on-policy policy gradient).
Symbols: ``group_size`` = k (G in the GRPO paper), ``clip_range`` = epsilon, ``kl_beta`` = beta.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from dinalrm_align.algorithms.grpo_config import BatchingPlan, GRPOConfig, trained_steps_per_sample
from dinalrm_align.algorithms.grpo_rollout import ExtraReward, RolloutBuffer, collect_epoch
from dinalrm_align.algorithms.policy import PolicyAlgorithm, PolicyContext
from dinalrm_align.trainer.config import TrainConfig
from dinalrm_align.trainer.grouping import KRepeatSampler, stable_hash
from dinalrm_align.trainer.sections import AlgorithmConfig

logger = logging.getLogger(__name__)

__all__ = ["GRPO", "GRPOConfig"]


class GRPO(PolicyAlgorithm):
    """Flow-GRPO style GRPO with the latent reward on final clean latents (see the module docstring)."""

    name: ClassVar[str] = "grpo"
    config_class: ClassVar[type[AlgorithmConfig]] = GRPOConfig
    config: GRPOConfig

    def __init__(self, config: GRPOConfig) -> None:
        super().__init__(config)
        self._trained_steps: int | None = None
        self.extras: list[ExtraReward] = []
        self.plan: BatchingPlan | None = None
        self.epoch = 0
        self.buffer: RolloutBuffer | None = None
        self.epoch_metrics: dict[str, Any] = {}
        #: Diagnostics of the last rollout epoch on this process (tests, debugging).
        self.last_rollout: dict[str, Any] = {}

    # ------------------------------------------------------------------ interface
    @property
    def micro_steps_per_batch(self) -> int:
        if self._trained_steps is None:
            raise RuntimeError("GRPO's trained steps are known after its preflight")
        return self._trained_steps

    def uses_sampling_cfg(self, recipe: TrainConfig) -> bool:
        return self.config.cfg

    def validate(self, recipe: TrainConfig, world_size: int) -> None:
        from dinalrm_align.backbones.registry import import_object

        c = self.config
        self._trained_steps = trained_steps_per_sample(c, recipe.sampling.num_steps)
        if c.cfg and recipe.sampling.guidance_scale <= 1.0:
            raise ValueError(f"algorithm.cfg: true needs sampling.guidance_scale > 1, got {recipe.sampling.guidance_scale}")
        if c.kl_beta > 0 and recipe.model.finetune != "lora":
            raise ValueError("algorithm.kl_beta > 0 needs a LoRA policy (model.finetune: lora): the KL reference is the "
                             "policy with its LoRA disabled")
        self.plan = BatchingPlan(
            processes=world_size, batch_size=recipe.train.batch_size, group_size=c.group_size,
            batches_per_epoch=c.num_batches_per_epoch, accumulation=recipe.train.accumulation_for(world_size),
            trained_steps=self._trained_steps,
        )
        for extra in c.extra_rewards:
            import_object(extra.target)

    def make_stream(self, prompts: list[str], run: Any) -> KRepeatSampler:
        """The k-repeat prompt stream (groups are always shuffled)."""
        acc = run.accelerator
        return KRepeatSampler(prompts, run.config.train.batch_size, self.config.group_size,
                              num_processes=acc.num_processes, rank=acc.process_index, seed=run.config.seed,
                              batches_per_epoch=self.config.num_batches_per_epoch)

    def setup_algorithm(self, ctx: PolicyContext) -> None:
        from dinalrm_align.trainer.evaluation import load_proxy_rewards

        steps = self.micro_steps_per_batch
        accumulation = ctx.accelerator.gradient_accumulation_steps // steps
        self.plan = BatchingPlan(
            processes=ctx.num_processes, batch_size=ctx.config.train.batch_size, group_size=self.config.group_size,
            batches_per_epoch=self.config.num_batches_per_epoch, accumulation=accumulation, trained_steps=steps,
        )
        self.extras = [ExtraReward(p) for p in load_proxy_rewards(self.config.extra_rewards)]
        every = ctx.config.checkpoint.every
        if every and every % self.plan.updates_per_epoch and ctx.accelerator.is_main_process:
            logger.warning("checkpoint.every=%d is not a multiple of the %d optimizer steps per epoch: mid-epoch "
                           "checkpoints also store the epoch's remaining rollouts", every, self.plan.updates_per_epoch)
        if ctx.accelerator.is_main_process:
            logger.info(self.plan.format())

    def guidance(self, ctx: PolicyContext) -> float:
        return ctx.config.sampling.guidance_scale if self.config.cfg else 1.0

    # ------------------------------------------------------------------ rollout helpers (used by collect_epoch)
    def global_index(self, ctx: PolicyContext, batch: int, i: int) -> int:
        """Index of sample ``i`` of rollout batch ``batch`` of this epoch among all samples of the run."""
        b, world = ctx.config.train.batch_size, ctx.num_processes
        per_epoch = self.config.num_batches_per_epoch * b * world
        return self.epoch * per_epoch + batch * b * world + ctx.process_index * b + i

    def window(self, ctx: PolicyContext, batch: int) -> tuple[int, int] | None:
        from dinalrm_align.sampling.rollout import choose_sde_window

        if self.config.sde_window_size <= 0:
            return None
        n = ctx.config.sampling.num_steps
        g = torch.Generator().manual_seed(stable_hash("grpo-window", ctx.config.seed, self.epoch, batch))
        return choose_sde_window(n, self.config.sde_window_size, self.config.window_range(n), generator=g)

    # ------------------------------------------------------------------ training
    def _train_chunk(self, ctx: PolicyContext, chunk: torch.Tensor) -> dict[str, Any]:
        """One micro-step per trained step on the samples ``chunk`` of :attr:`buffer` (device metrics)."""
        from dinalrm_align.algorithms.losses import gaussian_mean_kl, ppo_clip_loss
        from dinalrm_align.sampling.rollout import step_log_prob

        buf = self.buffer
        assert buf is not None
        c = self.config
        idx = chunk.to(buf.latents.device)
        lat, old, sig, adv = buf.latents[idx], buf.log_probs[idx], buf.sigmas[idx], buf.advantages[idx]
        cond = buf.cond[buf.embed_index[idx]]
        guidance = self.guidance(ctx)
        policy = ctx.denoiser(ctx.model, guidance_scale=guidance, detach_uncond=c.detach_uncond)
        step_kwargs = {"sde_type": c.sde_type, "noise_level": c.level}
        rows: list[dict[str, torch.Tensor]] = []
        for j in range(self.micro_steps_per_batch):
            x_t, x_next, s, s_next = lat[:, j], lat[:, j + 1], sig[:, j], sig[:, j + 1]
            ref = None
            if c.kl_beta > 0:  # reference first: adapters are toggled before the graded forward
                with torch.no_grad(), ctx.reference_policy() as ref_model, ctx.autocast():
                    ref = step_log_prob(policy.with_transformer(ref_model), x_t, x_next, s, s_next, cond, **step_kwargs)
            with ctx.accumulate():
                with ctx.autocast():
                    out = step_log_prob(policy, x_t, x_next, s, s_next, cond, **step_kwargs)
                policy_loss, info = ppo_clip_loss(out.log_prob, old[:, j], adv, c.clip_range)
                if ref is not None:
                    std = out.kl_std if c.kl_form == "flow_grpo" else out.std
                    kl = gaussian_mean_kl(out.mean, ref.mean, std).mean()
                    loss = policy_loss + c.kl_beta * kl
                else:
                    kl = torch.zeros((), device=policy_loss.device)
                    loss = policy_loss
                ctx.backward(loss)
            rows.append({"loss": loss.detach(), "kl_loss": kl.detach(), **{k: v.detach() for k, v in info.items()}})
        metrics: dict[str, Any] = {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]
                                   if k not in ("ratio_min", "ratio_max")}
        metrics["ratio_min"] = torch.stack([r["ratio_min"] for r in rows]).min()
        metrics["ratio_max"] = torch.stack([r["ratio_max"] for r in rows]).max()
        metrics["chunk_size"] = float(idx.numel())
        return metrics

    def train_step(self, prompts: list[str]) -> dict[str, Any]:
        """Roll out a new epoch if ``prompts`` is non-empty, then train one chunk (``W`` micro-steps)."""
        ctx = self.ctx
        assert ctx is not None
        pending = self.buffer is not None and bool(self.buffer.chunks)
        if prompts:
            if pending:
                raise RuntimeError("GRPO got new epoch prompts while chunks of the previous epoch are untrained: the "
                                   "prompt sampler and the algorithm are out of step")
            self.buffer, self.epoch_metrics, self.last_rollout = collect_epoch(self, ctx, list(prompts))
            self.epoch += 1
        elif not pending:
            raise RuntimeError("GRPO has no rollouts to train on and got no prompts: the trainer must take its prompt "
                               "stream from the algorithm (a k-repeat sampler that hands out whole epochs)")
        assert self.buffer is not None
        metrics = self._train_chunk(ctx, self.buffer.chunks.pop(0))
        metrics.update(self.epoch_metrics)
        if not self.buffer.chunks:
            self.buffer = None
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        metrics = {k: float(v) for k, v in self.epoch_metrics.items()}
        return {"epoch": self.epoch, "buffer": self.buffer.state_dict() if self.buffer is not None else None,
                "epoch_metrics": metrics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        buf = state.get("buffer")
        device = self.ctx.device if self.ctx is not None else None
        self.buffer = RolloutBuffer.from_state_dict(buf, device) if buf is not None else None
        self.epoch_metrics = {k: float(v) for k, v in (state.get("epoch_metrics") or {}).items()}
