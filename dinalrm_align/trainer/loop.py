"""The Trainer: one loop for every algorithm.

``Trainer(config).train()`` runs: preflight checks (cheap, before any model loads) -> accelerator,
models, optimizer, EMA, tracker -> optional resume -> updates (``train.gradient_accumulation_steps``
prompt batches each, then clip / optimizer / LR scheduler / EMA) with logging, periodic evaluation and
checkpoints -> the final weights (EMA swapped in) in ``run_dir/final`` and a summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.algorithms.base import Algorithm, TrainContext, resolve_algorithm
from dinalrm_align.trainer import accelerator as acc_lib
from dinalrm_align.trainer.checkpointing import (
    CheckpointManager,
    capture_rng_state,
    load_optimizer_state,
    optimizer_is_sharded,
    optimizer_state,
    read_marker,
    resolve_resume,
    restore_rng_state,
)
from dinalrm_align.trainer.config import TrainConfig, config_to_dict, save_config
from dinalrm_align.trainer.data import load_prompts, split_eval
from dinalrm_align.trainer.ema import EMA
from dinalrm_align.trainer.evaluation import Evaluator, check_proxy_rewards, load_proxy_rewards
from dinalrm_align.trainer.tracking import Tracker

logger = logging.getLogger("dinalrm_align.train")


@dataclass
class Preflight:
    """What the cheap checks found (nothing heavy is loaded yet)."""

    world_size: int
    accumulation: int
    train_prompts: list[str]
    eval_prompts: list[str]
    resume_from: Path | None
    zero_stage: int


@dataclass
class TrainSummary:
    """End-of-run summary (also written to ``run_dir/summary.json``)."""

    run_dir: str
    steps: int
    resumed_from_step: int
    time_s: float
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    final_dir: str | None = None
    final_format: str = ""
    eval_grid: str | None = None

    def format(self) -> str:
        def reward(m: dict[str, float]) -> str:
            return f"{m['eval/reward_raw']:.4f} (normalised {m['eval/reward_norm']:.4f})" if m else "n/a"

        lines = [
            "training finished",
            f"  steps            {self.steps} (resumed from {self.resumed_from_step})" if self.resumed_from_step
            else f"  steps            {self.steps}",
            f"  time             {self.time_s:.1f} s",
            f"  eval reward      before {reward(self.eval_before)}",
            f"                   after  {reward(self.eval_after)}",
        ]
        for key in sorted(set(self.eval_after) - {"eval/reward_raw", "eval/reward_norm", "eval/reward_raw_std"}):
            before = self.eval_before.get(key)
            lines.append(f"  {key:<16} {'' if before is None else f'{before:.4f} -> '}{self.eval_after[key]:.4f}")
        lines.append(f"  saved            {self.final_dir} ({self.final_format})")
        if self.eval_grid:
            lines.append(f"  eval grid        {self.eval_grid}")
        return "\n".join(lines)


class _MetricBuffer:
    """Collects train-step metrics: scalars are averaged, 1-D tensors are per-sample values."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[float]] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if torch.is_tensor(value) and value.ndim >= 1:
                self.samples.setdefault(key, []).append(value.detach().float().reshape(-1).cpu())
            else:
                self.scalars.setdefault(key, []).append(float(value))

    def reduce(self, accelerator: Any) -> dict[str, float]:
        """Average over micro-batches and processes (collective: every process must call it)."""
        out: dict[str, float] = {}
        device = accelerator.device
        if self.scalars:
            keys = sorted(self.scalars)
            local = torch.tensor([sum(self.scalars[k]) / len(self.scalars[k]) for k in keys], device=device)
            total = accelerator.reduce(local, reduction="mean") if accelerator.num_processes > 1 else local
            out.update({k: float(v) for k, v in zip(keys, total.cpu())})
        for key in sorted(self.samples):
            values = torch.cat(self.samples[key]).to(device)
            if accelerator.num_processes > 1:
                values = accelerator.gather(values)
            out[f"{key}_mean"] = float(values.mean())
            out[f"{key}_std"] = float(values.std(unbiased=False))
        return out


def build_reward_model(config: TrainConfig, pipeline: Any, device: torch.device, weight_dtype: torch.dtype) -> Any:
    """The frozen latent reward model named by ``reward.model`` (``tiny[:SEED]``, folder or hub id).

    Built on the policy transformer BEFORE the policy LoRA is added (its blocks are copied unless
    ``reward.share_base_weights``).
    """
    from dinalrm_align.trainer.policy import tiny_seed

    cfg = config.reward
    dtype = weight_dtype if cfg.dtype == "auto" else acc_lib.DTYPES[{"fp32": "no"}.get(cfg.dtype, cfg.dtype)]
    seed = tiny_seed(cfg.model)
    if seed is not None:
        from dinalrm_align.testing import tiny_reward_model

        rm = tiny_reward_model(
            pipeline.transformer, seed=seed, scheduler_config=dict(pipeline.scheduler.config),
            share_base_weights=cfg.share_base_weights,
        )
        rm = rm.to_device_dtype(device, dtype)
    else:
        from dinalrm_align.reward_model.model import LatentRewardModel

        path = Path(cfg.model).expanduser()
        if not path.exists() and (cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1):
            raise FileNotFoundError(f"reward model folder not found: {cfg.model} (reward.model)")
        rm = LatentRewardModel.from_pretrained(
            str(path) if path.exists() else cfg.model,
            transformer=pipeline.transformer,
            torch_dtype=dtype,
            device=device,
            share_base_weights=cfg.share_base_weights,
            scheduler_config=dict(pipeline.scheduler.config),
        )
    rm.requires_grad_(False)
    return rm.eval()


class Trainer:
    """Runs an :class:`~dinalrm_align.algorithms.base.Algorithm` with the shared infrastructure.

    Args:
        config: the resolved recipe.
        algorithm: an algorithm instance (default: built from ``config.algorithm``).

    After :meth:`setup` the attributes ``accelerator``, ``pipeline``, ``model`` (prepared),
    ``transformer`` (unwrapped), ``reward_model``, ``optimizer``, ``lr_scheduler``, ``ema``,
    ``sampler``, ``evaluator``, ``tracker``, ``ctx`` and ``step`` are available.
    """

    def __init__(self, config: TrainConfig, algorithm: Algorithm | None = None) -> None:
        self.config = config
        if algorithm is None:
            algorithm = resolve_algorithm(config.algorithm.name)(config.algorithm)
        self.algorithm = algorithm
        self.run_dir = Path(config.run_dir)
        self.step = 0
        self.resumed_from_step = 0
        self.eval_before: dict[str, float] = {}
        self.eval_after: dict[str, float] = {}
        self.last_grid: Path | None = None
        self.step_losses: list[float] = []
        self._pre: Preflight | None = None
        self._is_setup = False
        self._last_eval_step = -1

    # ------------------------------------------------------------------ checks
    def preflight(self) -> Preflight:
        """Cheap validation of everything that can be checked before loading models."""
        cfg = self.config
        world = acc_lib.launched_world_size()
        accumulation = cfg.train.accumulation_for(world)
        prompts = load_prompts(cfg.data.prompts, cfg.data.format, cfg.data.column, cfg.data.split)
        eval_source = None
        if cfg.data.eval_prompts:
            eval_source = load_prompts(
                cfg.data.eval_prompts, cfg.data.format, cfg.data.column, cfg.data.eval_split or cfg.data.split
            )
        train_prompts, eval_prompts = split_eval(prompts, cfg.data.num_eval_prompts, cfg.seed, eval_source)
        if not train_prompts:
            raise ValueError(f"no training prompts left in {cfg.data.prompts!r} after the eval split")
        resume = resolve_resume(cfg.checkpoint.resume, cfg.run_dir)
        if resume is not None:
            written = int(read_marker(resume)["num_processes"])
            if written != world:
                raise ValueError(
                    f"checkpoint {resume} was written by {written} processes; this launch has {world}"
                )
        stage = acc_lib.planned_zero_stage()
        if cfg.reward.share_base_weights and stage == 3:
            raise ValueError(
                "reward.share_base_weights: true cannot be used under DeepSpeed ZeRO-3 (the shared blocks are "
                "partitioned); set it to false or use ZeRO-2 / DDP"
            )
        self.algorithm.validate(cfg)
        check_proxy_rewards(cfg.eval.proxy_rewards)
        self._pre = Preflight(world, accumulation, train_prompts, eval_prompts, resume, stage)
        return self._pre

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build accelerator, models, optimizer, EMA, tracker; resume if asked."""
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        from dinalrm_align.trainer.policy import load_pipeline, make_trainable

        pre = self._pre or self.preflight()
        cfg = self.config
        acc = acc_lib.build_accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=pre.accumulation * self.algorithm.micro_steps_per_batch,
            run_dir=self.run_dir,
            log_with=cfg.tracking.log_with,
            micro_batch_size=cfg.train.batch_size,
            max_grad_norm=cfg.optim.max_grad_norm,
        )
        self.accelerator = acc
        self.zero_stage = acc_lib.zero_stage(acc)
        if acc.num_processes != pre.world_size:  # launcher did not announce WORLD_SIZE
            pre.accumulation = cfg.train.accumulation_for(acc.num_processes)
            acc.gradient_accumulation_steps = pre.accumulation * self.algorithm.micro_steps_per_batch
        if cfg.reward.share_base_weights and self.zero_stage == 3:
            raise ValueError("reward.share_base_weights: true cannot be used under DeepSpeed ZeRO-3")
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        if cfg.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        set_seed(cfg.seed)

        weight_dtype = acc_lib.DTYPES[cfg.train.mixed_precision]
        with acc_lib.no_zero3_init(acc):
            pipe = load_pipeline(cfg.model, weight_dtype)
        vsf = pipe.vae_scale_factor
        if cfg.sampling.resolution % vsf != 0:
            raise ValueError(f"sampling.resolution {cfg.sampling.resolution} is not divisible by the VAE factor {vsf}")
        side = cfg.sampling.resolution // vsf
        latent_shape = (int(pipe.transformer.config.in_channels), side, side)
        pipe.to(acc.device)
        with acc_lib.no_zero3_init(acc):
            reward_model = build_reward_model(cfg, pipe, acc.device, weight_dtype)
        params = make_trainable(pipe.transformer, cfg.model, weight_dtype)

        optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps
        )
        self.lr_scheduler = get_scheduler(
            cfg.optim.lr_scheduler, optimizer,
            num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.train.max_steps,
        )
        self.model, self.optimizer = acc.prepare(pipe.transformer, optimizer)
        self.transformer = acc.unwrap_model(self.model)
        self.pipeline = pipe
        self.reward_model = reward_model
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.ema = None
        if cfg.ema.enabled:
            self.ema = EMA(
                self.params, cfg.ema.decay, cfg.ema.update_every,
                gather=lambda ps, modify: acc_lib.gathered_parameters(self.zero_stage, ps, modify=modify),
            )
        self.sampler = self.algorithm.build_sampler(
            pre.train_prompts, batch_size=cfg.train.batch_size,
            num_processes=acc.num_processes, rank=acc.process_index, seed=cfg.seed, shuffle=cfg.data.shuffle,
        )
        self.accumulation = pre.accumulation
        self.ctx = TrainContext(
            config=cfg, accelerator=acc, pipeline=pipe, model=self.model, transformer=self.transformer,
            reward_model=reward_model, weight_dtype=weight_dtype, latent_shape=latent_shape,
        )
        self.evaluator = Evaluator(
            pre.eval_prompts, self.run_dir,
            num_steps=cfg.eval.num_steps, guidance_scale=cfg.eval.guidance_scale, batch_size=cfg.eval.batch_size,
            seed=cfg.eval.seed, images=cfg.eval.images, grid_columns=cfg.eval.grid_columns,
            proxies=load_proxy_rewards(cfg.eval.proxy_rewards),
        )
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, acc)
        self.tracker = Tracker(acc, cfg.tracking, self.run_dir)
        self.algorithm.setup(self.ctx)
        if pre.resume_from is not None:
            self.load_checkpoint(pre.resume_from)
        self._is_setup = True

    # ------------------------------------------------------------------ checkpoints
    def _weights(self) -> dict[str, torch.Tensor]:
        with acc_lib.gathered_parameters(self.zero_stage, self.params):
            return {n: p.detach().cpu().clone().float() for n, p in self.transformer.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path:
        sharded = optimizer_is_sharded(self.optimizer)
        shared: dict[str, Any] = {"lr_scheduler": self.lr_scheduler.state_dict(), "data": self.sampler.state_dict()}
        per_rank: dict[str, Any] = {"rng": capture_rng_state(), "algorithm": self.algorithm.state_dict()}
        (per_rank if sharded else shared)["optimizer"] = optimizer_state(self.optimizer)
        if self.ema is not None:
            shared["ema"] = self.ema.state_dict()
        meta = {"eval_before": self.eval_before, "algorithm": self.algorithm.name}
        return self.checkpoints.save(self.step, weights=self._weights, shared=shared, per_rank=per_rank, meta=meta)

    def load_checkpoint(self, path: Path) -> None:
        from dinalrm_align.trainer.policy import load_trainable_state_dict

        state = self.checkpoints.load(path)
        items = {**state["shared"], **state["per_rank"]}
        with acc_lib.gathered_parameters(self.zero_stage, self.params, modify=True):
            load_trainable_state_dict(self.transformer, state["weights"])
        load_optimizer_state(self.optimizer, items["optimizer"], self.accelerator.num_processes)
        self.lr_scheduler.load_state_dict(items["lr_scheduler"])
        self.sampler.load_state_dict(items["data"])
        if self.ema is not None:
            if "ema" not in items:
                raise ValueError(f"checkpoint {path} has no EMA state but ema.enabled is true")
            self.ema.load_state_dict(items["ema"])
        self.algorithm.load_state_dict(items["algorithm"])
        restore_rng_state(items["rng"])
        self.step = self.resumed_from_step = state["step"]
        self.eval_before = dict(state["meta"].get("eval_before") or {})
        self._log_line(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ eval / save
    def evaluate(self) -> dict[str, float]:
        """Evaluate with EMA weights swapped in (if enabled); logs and returns the metrics."""
        if not self.evaluator.prompts:
            return {}
        self._last_eval_step = self.step
        self.transformer.eval()
        try:
            if self.ema is not None:
                with self.ema.swapped():
                    out = self.evaluator.evaluate(self.ctx, self.step)
            else:
                out = self.evaluator.evaluate(self.ctx, self.step)
        finally:
            self.transformer.train()
        if self.accelerator.is_main_process and out.metrics:
            self.tracker.log(out.metrics, step=self.step)
            if out.grid_path is not None:
                self.last_grid = out.grid_path
                caption = " | ".join(f"{p[:40]}: {r:.3f}" for p, r in zip(out.prompts, out.rewards))
                from PIL import Image

                with Image.open(out.grid_path) as img:
                    self.tracker.log_image("eval/samples", img.copy(), step=self.step, caption=caption)
            self._log_line(
                f"eval @ step {self.step}: reward {out.metrics['eval/reward_raw']:.4f} "
                f"(normalised {out.metrics['eval/reward_norm']:.4f})"
                + "".join(f", {k.split('/')[-1]} {v:.4f}" for k, v in out.metrics.items() if k.startswith("eval/proxy/"))
            )
        return out.metrics

    def save_final(self) -> Path:
        """Save the trained weights (EMA if enabled) to ``run_dir/final`` (LoRA or full transformer)."""
        from dinalrm_align.trainer.policy import save_full, save_lora

        out = self.run_dir / "final"
        ctx_mgr = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        with ctx_mgr:
            if self.config.model.finetune == "lora":
                weights = self._weights()
                if self.accelerator.is_main_process:
                    save_lora(self.transformer, out, self.config.model.lora.adapter_name, state_dict=weights)
            else:
                with acc_lib.gathered_parameters(self.zero_stage, list(self.transformer.parameters())):
                    if self.accelerator.is_main_process:
                        save_full(self.transformer, out)
        self.accelerator.wait_for_everyone()
        return out

    # ------------------------------------------------------------------ logging helpers
    def _log_line(self, text: str) -> None:
        if getattr(self, "accelerator", None) is None or self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"[dinalrm-align] {text}")

    # ------------------------------------------------------------------ the loop
    def _update(self) -> dict[str, float]:
        """One optimizer update; returns the reduced metrics (every process)."""
        acc, cfg = self.accelerator, self.config
        buffer = _MetricBuffer()
        acc_lib.reset_peak_memory(acc.device)
        t0 = time.perf_counter()
        for _ in range(self.accumulation):
            prompts = self.sampler.next_batch()
            buffer.add(self.algorithm.train_step(self.ctx, prompts))
        if not acc.sync_gradients:
            raise RuntimeError(
                f"algorithm {self.algorithm.name!r} made fewer micro-steps than micro_steps_per_batch="
                f"{self.algorithm.micro_steps_per_batch} promised (gradients were not synchronised)"
            )
        max_norm = cfg.optim.max_grad_norm
        grad_norm = acc.clip_grad_norm_(self.params, max_norm if max_norm else math.inf)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.step(self.step)
        dt = time.perf_counter() - t0
        metrics = {f"train/{k}": v for k, v in buffer.reduce(acc).items()}
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        samples = cfg.train.batch_size * acc.num_processes * self.accumulation
        metrics.update(
            {
                "train/lr": float(self.lr_scheduler.get_last_lr()[0]),
                "train/epoch": float(self.sampler.position) / len(self.sampler.prompts),
                "perf/step_time_s": dt,
                "perf/samples_per_s": samples / dt,
                "perf/peak_mem_gb": acc_lib.peak_memory_gb(acc.device),
            }
        )
        return metrics

    def train(self) -> TrainSummary:
        """Run the whole training; returns (and on the main process prints) the summary."""
        from tqdm.auto import tqdm

        if not self._is_setup:
            self.setup()
        cfg, acc = self.config, self.accelerator
        t_start = time.perf_counter()
        self.tracker.start(config_to_dict(cfg))
        try:
            if cfg.eval.at_start and self.step == 0:
                self.eval_before = self.evaluate()
            bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not acc.is_main_process,
                       desc="train", dynamic_ncols=True)
            print_every = max(cfg.train.log_every, cfg.train.max_steps // 10, 1)
            while self.step < cfg.train.max_steps:
                metrics = self._update()
                self.step_losses.append(metrics.get("train/loss", float("nan")))
                if self.step % cfg.train.log_every == 0:
                    self.tracker.log(metrics, step=self.step)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics.get('train/loss', float('nan')):.4f}",
                    reward=f"{metrics.get('train/reward_raw_mean', float('nan')):.3f}",
                )
                if self.step % print_every == 0:
                    self._log_line(_format_step(self.step, cfg.train.max_steps, metrics))
                last = self.step == cfg.train.max_steps
                if (cfg.eval.every and self.step % cfg.eval.every == 0) or (last and cfg.eval.at_end):
                    self.eval_after = self.evaluate()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    path = self.save_checkpoint()
                    self._log_line(f"checkpoint saved: {path}")
            bar.close()
            if cfg.eval.at_end and self._last_eval_step != self.step:  # e.g. resumed from the last step
                self.eval_after = self.evaluate()
            final = self.save_final()
        finally:
            self.tracker.finish()
        summary = TrainSummary(
            run_dir=str(self.run_dir),
            steps=self.step,
            resumed_from_step=self.resumed_from_step,
            time_s=time.perf_counter() - t_start,
            eval_before=self.eval_before,
            eval_after=self.eval_after,
            final_dir=str(final),
            final_format="diffusers LoRA" if cfg.model.finetune == "lora" else "SD3Transformer2DModel folder",
            eval_grid=str(self.last_grid) if self.last_grid else None,
        )
        if acc.is_main_process:
            (self.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
            self._log_line(summary.format())
        return summary


def _format_step(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, label, fmt in (
        ("train/loss", "loss", ".4f"),
        ("train/reward_raw_mean", "reward", ".3f"),
        ("train/grad_norm", "grad", ".3g"),
        ("train/k", "k", ".1f"),
        ("perf/step_time_s", "s/step", ".2f"),
    ):
        if key in m:
            parts.append(f"{label} {m[key]:{fmt}}")
    return " | ".join(parts)
