"""Reward-model training on latent preference pairs, on the shared trainer infrastructure.

Per step (dina_lrm.md 4.2): a single-bucket batch of pairs; prompts re-encoded with the frozen SD3
text stack (cached); one ``u`` per pair (uniform or logit-normal) mapped to the nearest table sigma;
ONE noise draw per pair shared by chosen and rejected; both scored in one pass; preference loss;
backward; clip; AdamW; LR schedule; EMA of the trainable weights (LoRA + head).

Infrastructure reused from :mod:`dinalrm_align.trainer`: the Accelerator (mixed precision, gloo on
CPU, DeepSpeed config), atomic checkpoints with RNG / data-position state and rotation, trackers
(+ ``metrics.jsonl``), the EMA. Every checkpoint also holds ``model/``: the EMA weights in the
released layout, loadable with ``LatentRewardModel.from_pretrained``; the final model is written
to ``run_dir/final``.

Evaluation runs on the main process (other processes wait), so DeepSpeed ZeRO-3 is not supported
here (DDP and ZeRO-1/2 are).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.rm_training.config import RMTrainConfig
from dinalrm_align.rm_training.data import (
    BucketBatchSampler,
    PairDataset,
    PairIndex,
    build_index,
    min_votes_filter,
)
from dinalrm_align.rm_training.evaluate import EvalSettings, score_pairs
from dinalrm_align.rm_training.losses import preference_loss, sample_u
from dinalrm_align.rm_training.pair import PairScorer
from dinalrm_align.trainer import accelerator as acc_lib
from dinalrm_align.trainer.checkpointing import (
    CheckpointManager,
    capture_rng_state,
    load_optimizer_state,
    optimizer_is_sharded,
    optimizer_state,
    resolve_resume,
    restore_rng_state,
)
from dinalrm_align.trainer.config import ModelConfig, config_to_dict, save_config
from dinalrm_align.trainer.ema import EMA
from dinalrm_align.trainer.tracking import Tracker


def build_reward_model(cfg: RMTrainConfig, pipe: Any) -> Any:
    """A trainable reward model on ``pipe.transformer``'s first blocks (fresh or from ``init_from``)."""
    from dinalrm_align.reward_model.config import RewardModelConfig
    from dinalrm_align.reward_model.model import LatentRewardModel

    scheduler_config = dict(pipe.scheduler.config)
    if cfg.model.init_from:
        return LatentRewardModel.from_pretrained(
            cfg.model.init_from, transformer=pipe.transformer, scheduler_config=scheduler_config,
            torch_dtype=torch.float32,
        )
    if cfg.model.preset == "tiny":
        from dinalrm_align.testing import tiny_reward_model_config

        full = tiny_reward_model_config()
    else:
        full = RewardModelConfig().to_dict()
    full["model"].update(cfg.model.architecture)
    rm = LatentRewardModel.from_config(full, transformer=pipe.transformer, scheduler_config=scheduler_config)
    if cfg.model.zero_init_noise > 0:
        with torch.no_grad():
            for name, p in rm.named_parameters():
                trainable = name.startswith("reward_head.") or "lora_B" in name
                if trainable and p.dim() > 0 and torch.count_nonzero(p) == 0:
                    p.normal_(0.0, cfg.model.zero_init_noise)
    return rm


def load_pair_data(cfg: RMTrainConfig) -> tuple[PairDataset, PairIndex, PairDataset | None, PairIndex | None]:
    """``(train_dataset, train_index, eval_dataset, eval_index)`` per the ``data`` section."""
    index = build_index(cfg.data.train)
    if cfg.data.min_votes is not None:
        index = index.filter(min_votes_filter(cfg.data.min_votes))
    if cfg.data.eval:
        eval_index = build_index(cfg.data.eval)
        train_index = index
    elif cfg.data.num_eval > 0:
        train_index, eval_index = index.split(cfg.data.num_eval, seed=cfg.seed)
    else:
        train_index, eval_index = index, None
    if len(train_index) == 0:
        raise ValueError(f"no training pairs left in {cfg.data.train} (after filters / the eval split)")
    train_ds = PairDataset(train_index)
    eval_ds = PairDataset(eval_index) if eval_index is not None and len(eval_index) else None
    return train_ds, train_index, eval_ds, eval_index


@dataclass
class RMTrainSummary:
    """End-of-run summary (also ``run_dir/summary.json``)."""

    run_dir: str
    steps: int
    resumed_from_step: int
    time_s: float
    final_dir: str
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        lines = ["reward-model training finished", f"  steps      {self.steps}", f"  time       {self.time_s:.1f} s"]
        for key in sorted(self.eval_after):
            before = self.eval_before.get(key)
            lines.append(f"  {key:<22} {'' if before is None else f'{before:.4f} -> '}{self.eval_after[key]:.4f}")
        lines.append(f"  saved      {self.final_dir} (released layout, EMA weights)")
        return "\n".join(lines)


class RewardModelTrainer:
    """Trains a :class:`~dinalrm_align.reward_model.model.LatentRewardModel` from an :class:`RMTrainConfig`.

    ``setup()`` builds everything (and resumes); ``train()`` runs to ``train.max_steps``. After setup:
    ``accelerator``, ``pipeline``, ``reward_model`` (unwrapped), ``model`` (prepared pair scorer),
    ``optimizer``, ``lr_scheduler``, ``ema``, ``sampler``, ``step``.
    """

    def __init__(self, config: RMTrainConfig, progress: bool = True) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.progress = progress
        self.step = 0
        self.resumed_from_step = 0
        self.eval_history: list[dict[str, float]] = []
        self._is_setup = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        from dinalrm_align.reward_model.text import PromptEmbeddingCache
        from dinalrm_align.trainer.policy import load_pipeline

        cfg = self.config
        resume = resolve_resume(cfg.checkpoint.resume, cfg.run_dir)
        self.train_ds, self.train_index, self.eval_ds, self.eval_index = load_pair_data(cfg)
        world = acc_lib.launched_world_size()
        acc = acc_lib.build_accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.accumulation_for(world),
            run_dir=self.run_dir,
            log_with=cfg.tracking.log_with,
            micro_batch_size=cfg.train.batch_size,
            max_grad_norm=cfg.optim.max_grad_norm,
        )
        if acc_lib.zero_stage(acc) == 3:
            raise ValueError("reward-model training does not support DeepSpeed ZeRO-3; use DDP or ZeRO-1/2")
        self.accelerator = acc
        self.accumulation = cfg.train.accumulation_for(acc.num_processes)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        set_seed(cfg.seed)

        weight_dtype = acc_lib.DTYPES[cfg.train.mixed_precision]
        pipe = load_pipeline(
            ModelConfig(pretrained=cfg.model.pipeline, revision=cfg.model.revision, variant=cfg.model.variant),
            torch.float32,
        )
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(acc.device)
        self.pipeline = pipe
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            rm = build_reward_model(cfg, pipe)
        rm.config.extra["rm_training"] = config_to_dict(cfg)
        params = rm.set_trainable(lora=cfg.model.train_lora, head=cfg.model.train_head)
        if not params:
            raise ValueError("the reward model has no trainable parameters (no LoRA and head frozen?)")
        if weight_dtype != torch.float32:  # frozen weights in the mixed-precision dtype, trainable fp32
            for p in rm.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(weight_dtype)
        rm.to(acc.device)
        self.reward_model = rm
        self.param_names = [n for n, p in rm.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps
        )
        self.lr_scheduler = get_scheduler(
            cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
            num_training_steps=cfg.train.max_steps,
        )
        self.model, self.optimizer = acc.prepare(PairScorer(rm), optimizer)
        self.params = params
        self.ema = EMA(params, cfg.ema.decay, cfg.ema.update_every) if cfg.ema.enabled else None
        self.sampler = BucketBatchSampler(
            self.train_index, cfg.train.batch_size, num_processes=acc.num_processes, rank=acc.process_index,
            seed=cfg.seed, shuffle=cfg.data.shuffle,
        )
        self.generator = torch.Generator().manual_seed(cfg.seed * 1009 + acc.process_index)
        self.text_cache = PromptEmbeddingCache(cfg.data.text_cache) if cfg.data.text_cache else None
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, acc)
        self.tracker = Tracker(acc, cfg.tracking, self.run_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        self._is_setup = True

    # ------------------------------------------------------------------ pieces
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen text stack (no grad, cached) -> fp32 embeddings on the accelerator device."""
        from dinalrm_align.reward_model.text import encode_prompts

        return encode_prompts(
            self.pipeline, prompts, self.config.model.max_sequence_length, device=self.accelerator.device,
            dtype=torch.float32, cache=self.text_cache,
        )

    def _micro_step(self) -> dict[str, float]:
        cfg, acc, rm = self.config, self.accelerator, self.reward_model
        batch = self.train_ds.batch(self.sampler.next_batch())
        pe, pooled = self.encode(batch.prompts)
        b = len(batch)
        u = sample_u(
            b, cfg.loss.u_sampler, generator=self.generator, logit_mean=cfg.loss.logit_mean,
            logit_std=cfg.loss.logit_std, low=cfg.loss.u_min, high=cfg.loss.u_max,
        )
        sigma, _ = rm.sigma_for(u)
        noise = torch.randn(batch.chosen.shape, generator=self.generator)
        device = acc.device
        with acc.accumulate(self.model), acc.autocast():
            r_pos, r_neg = self.model(
                batch.chosen.to(device), batch.rejected.to(device), sigma.to(device), noise.to(device), pe, pooled
            )
            loss = preference_loss(
                cfg.loss.name, r_pos, r_neg, sigma.to(device), variance_scale=cfg.loss.variance_scale,
                variance_floor=cfg.loss.variance_floor, constant_variance=cfg.loss.constant_variance,
            )
            acc.backward(loss)
        margin = (r_pos - r_neg).detach().float()
        return {
            "loss": float(loss.detach()),
            "pair_accuracy": float((margin > 0).float().mean()),
            "margin": float(margin.mean()),
            "sigma": float(sigma.mean()),
        }

    def _update(self) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        parts = [self._micro_step() for _ in range(self.accumulation)]
        max_norm = cfg.optim.max_grad_norm
        grad_norm = acc.clip_grad_norm_(self.params, max_norm if max_norm else math.inf)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.step(self.step)
        local = torch.tensor([[p[k] for k in sorted(parts[0])] for p in parts], device=acc.device).mean(0)
        if acc.num_processes > 1:
            local = acc.reduce(local, reduction="mean")
        metrics = {f"train/{k}": float(v) for k, v in zip(sorted(parts[0]), local.cpu())}
        dt = time.perf_counter() - t0
        metrics.update(
            {
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/lr": float(self.lr_scheduler.get_last_lr()[0]),
                "train/epoch": self.sampler.epoch + self.sampler.position / max(1, self.sampler.batches_per_epoch()),
                "perf/step_time_s": dt,
                "perf/pairs_per_s": cfg.train.batch_size * acc.num_processes * self.accumulation / dt,
            }
        )
        return metrics

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """Context with the EMA weights swapped in (no-op without EMA)."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def evaluate(self) -> dict[str, float]:
        """Pairwise accuracy per eval level with the EMA weights (main process; others wait)."""
        cfg, acc = self.config, self.accelerator
        metrics: dict[str, float] = {}
        if self.eval_ds is not None and acc.is_main_process:
            settings = EvalSettings(
                us=tuple(cfg.eval.us), ensemble=tuple(cfg.eval.ensemble) if cfg.eval.ensemble else None,
                seed=cfg.eval.seed, n_noise=cfg.eval.n_noise, batch_size=cfg.eval.batch_size,
            )
            n = len(self.eval_ds) if cfg.eval.num_pairs is None else min(cfg.eval.num_pairs, len(self.eval_ds))
            rm = self.reward_model
            rm.eval()
            with self.ema_weights(), torch.no_grad():
                scores = score_pairs(rm, self.eval_ds, self.encode, settings, positions=list(range(n)))
            metrics = {f"eval/accuracy_u{k}": v for k, v in scores.accuracy().items()}
            metrics["eval/num_pairs"] = float(n)
            self.tracker.log(metrics, step=self.step)
            self.eval_history.append({"step": float(self.step), **metrics})
            self._log_line(f"eval @ step {self.step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()))
        acc.wait_for_everyone()
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _trainable_weights(self) -> dict[str, torch.Tensor]:
        named = dict(self.reward_model.named_parameters())
        return {n: named[n].detach().cpu().float().clone() for n in self.param_names}

    def save_model(self, folder: Path) -> Path:
        """EMA weights in the released layout (main process)."""
        if self.accelerator.is_main_process:
            with self.ema_weights():
                self.reward_model.save_pretrained(folder)
        self.accelerator.wait_for_everyone()
        return folder

    def save_checkpoint(self) -> Path:
        sharded = optimizer_is_sharded(self.optimizer)
        shared: dict[str, Any] = {"lr_scheduler": self.lr_scheduler.state_dict(), "data": self.sampler.state_dict()}
        per_rank: dict[str, Any] = {"rng": capture_rng_state(), "generator": self.generator.get_state()}
        (per_rank if sharded else shared)["optimizer"] = optimizer_state(self.optimizer)
        if self.ema is not None:
            shared["ema"] = self.ema.state_dict()
        path = self.checkpoints.save(
            self.step, weights=self._trainable_weights, shared=shared, per_rank=per_rank,
            meta={"kind": "reward_model", "eval_history": self.eval_history},
        )
        self.save_model(path / "model")
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = self.checkpoints.load(path)
        items = {**state["shared"], **state["per_rank"]}
        named = dict(self.reward_model.named_parameters())
        missing = [n for n in self.param_names if n not in state["weights"]]
        if missing:
            raise ValueError(f"checkpoint {path} lacks trainable weight(s) {missing[:3]} (different model?)")
        with torch.no_grad():
            for n in self.param_names:
                named[n].copy_(state["weights"][n].to(named[n].dtype))
        load_optimizer_state(self.optimizer, items["optimizer"], self.accelerator.num_processes)
        self.lr_scheduler.load_state_dict(items["lr_scheduler"])
        self.sampler.load_state_dict(items["data"])
        if self.ema is not None:
            if "ema" not in items:
                raise ValueError(f"checkpoint {path} has no EMA state but ema.enabled is true")
            self.ema.load_state_dict(items["ema"])
        restore_rng_state(items["rng"])
        self.generator.set_state(items["generator"])
        self.step = self.resumed_from_step = state["step"]
        self.eval_history = list(state["meta"].get("eval_history") or [])
        self._log_line(f"resumed from {path} at step {self.step}")

    def _log_line(self, text: str) -> None:
        if self.progress and self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"[dinalrm-align] {text}")

    # ------------------------------------------------------------------ the loop
    def train(self) -> RMTrainSummary:
        from tqdm.auto import tqdm

        if not self._is_setup:
            self.setup()
        cfg, acc = self.config, self.accelerator
        t_start = time.perf_counter()
        self.tracker.start(config_to_dict(cfg))
        before: dict[str, float] = {}
        after: dict[str, float] = {}
        try:
            if cfg.eval.at_start and self.step == 0:
                before = self.evaluate()
            self.reward_model.train()
            bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train reward model",
                       disable=not (self.progress and acc.is_main_process), dynamic_ncols=True)
            while self.step < cfg.train.max_steps:
                metrics = self._update()
                if self.step % cfg.train.log_every == 0:
                    self.tracker.log(metrics, step=self.step)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/pair_accuracy']:.2f}")
                last = self.step == cfg.train.max_steps
                if (cfg.eval.every and self.step % cfg.eval.every == 0) or (last and cfg.eval.at_end):
                    after = self.evaluate()
                    self.reward_model.train()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self._log_line(f"checkpoint saved: {self.save_checkpoint()}")
            bar.close()
            self.reward_model.eval()
            final = self.save_model(self.run_dir / "final")
        finally:
            self.tracker.finish()
        summary = RMTrainSummary(
            run_dir=str(self.run_dir), steps=self.step, resumed_from_step=self.resumed_from_step,
            time_s=time.perf_counter() - t_start, final_dir=str(final), eval_before=before, eval_after=after,
        )
        if acc.is_main_process:
            (self.run_dir / "summary.json").write_text(
                json.dumps({**asdict(summary), "eval_history": self.eval_history}, indent=2)
            )
            self._log_line(summary.format())
        return summary


def train_reward_model(config: RMTrainConfig, progress: bool = True) -> RMTrainSummary:
    """Build a :class:`RewardModelTrainer` and run it."""
    return RewardModelTrainer(config, progress=progress).train()
