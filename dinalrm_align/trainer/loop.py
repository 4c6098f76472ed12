"""The Trainer: one loop for every algorithm (ReFL, GRPO, reward-model training, your own).

``Trainer(config).train()``: preflight (cheap checks, nothing loaded) -> accelerator -> the algorithm
builds its models and data -> optimizer, LR schedule, ``accelerator.prepare`` -> EMA, tracker,
checkpoints (``accelerator.save_state`` with the EMA, data position and trainer state registered) ->
resume -> updates with logging, divergence checks, evaluation and checkpoints -> final weights (EMA
swapped in) in ``run_dir/final`` with a model card, and a summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.algorithms.base import Algorithm, EvalResult, Preflight, RunState
from dinalrm_align.atomic import replace_folder, write_atomic
from dinalrm_align.trainer import accelerator as acc_lib
from dinalrm_align.trainer.checkpointing import (
    CheckpointManager,
    check_fresh_run_dir,
    resolve_checkpoint_spec,
)
from dinalrm_align.trainer.guard import DivergenceGuard, TrainingDiverged
from dinalrm_align.trainer.metrics import MetricBuffer
from dinalrm_align.trainer.recipe import config_to_dict, flatten_dict, recipe_fingerprint, save_config
from dinalrm_align.trainer.sections import RunConfig
from dinalrm_align.trainer.state import TrainerState, register_state_hooks
from dinalrm_align.trainer.summary import TrainSummary
from dinalrm_align.trainer.tracking import Tracker

logger = logging.getLogger(__name__)

__all__ = ["TrainSummary", "Trainer", "TrainingDiverged"]


class Trainer:
    """Runs an :class:`~dinalrm_align.algorithms.base.Algorithm` with the shared infrastructure.

    Args:
        config: the resolved recipe.
        algorithm: an algorithm instance (default: built from ``config.algorithm``).
        progress: show a progress bar (main process only).

    After :meth:`setup`: ``accelerator``, ``model`` (prepared), ``optimizer``, ``lr_scheduler``, ``params``,
    ``ema``, ``data``, ``tracker``, ``checkpoints``, ``state`` (step, evaluation history).
    """

    def __init__(self, config: RunConfig, algorithm: Algorithm | None = None, *, progress: bool = True) -> None:
        from dinalrm_align.algorithms.registry import resolve_algorithm

        self.config = config
        self.algorithm = algorithm if algorithm is not None else resolve_algorithm(config.algorithm.name)(config.algorithm)
        self.run_dir = Path(config.run_dir)
        self.progress = progress
        self.state = TrainerState()
        self.pre: Preflight | None = None
        self._is_setup = False
        self._last_eval_step = -1
        self._headline: list[str] = []

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------ checks
    def preflight(self) -> Preflight:
        """Cheap validation of everything that can be checked before loading models."""
        cfg = self.config
        world = acc_lib.launched_world_size()
        self.pre = self.algorithm.preflight(cfg, world)
        self.algorithm.check_sharding(cfg, acc_lib.planned_sharding())
        resolve_checkpoint_spec(cfg.checkpoint.resume, cfg.run_dir)  # a missing / wrong folder fails now
        if not cfg.checkpoint.resume:
            check_fresh_run_dir(cfg.run_dir)
        return self.pre

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Accelerator, models, optimizer, EMA, tracker, checkpoints; resume if asked."""
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        pre = self.pre or self.preflight()
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
        if acc.num_processes != pre.world_size:  # the launcher did not announce WORLD_SIZE
            pre.accumulation = cfg.train.accumulation_for(acc.num_processes)
            acc.gradient_accumulation_steps = pre.accumulation * self.algorithm.micro_steps_per_batch
        self.sharding = acc_lib.sharding_of(acc)
        self.algorithm.check_sharding(cfg, self.sharding)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        if cfg.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        set_seed(cfg.seed)

        run = RunState(cfg, acc, acc_lib.DTYPES[cfg.train.mixed_precision], self.sharding, pre, self.run_dir)
        self.run = run
        with acc_lib.no_zero3_init(acc):
            built = self.algorithm.build(run)
        if not built.params:
            raise ValueError(f"algorithm {self.algorithm.name!r} has no trainable parameters")
        optimizer = torch.optim.AdamW(
            built.params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
            eps=cfg.optim.eps,
        )
        lr_scheduler = get_scheduler(
            cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
            num_training_steps=cfg.train.max_steps,
        )
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(built.module, optimizer, lr_scheduler)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.data = built.data
        self.algorithm.setup(run, self.model)
        self.ema = None
        if cfg.ema.enabled:
            from dinalrm_align.trainer.ema import EMA

            self.ema = EMA(self.params, cfg.ema, gather=lambda ps, modify: acc_lib.gathered_parameters(
                self.sharding, ps, modify=modify))
        self.guard = DivergenceGuard(acc.device)
        self.tracker = Tracker(acc, cfg.tracking, self.run_dir)
        flat = flatten_dict(config_to_dict(cfg))
        skip = tuple(getattr(cfg, "RESUMABLE_CHANGES", ()))
        self.checkpoints = CheckpointManager(
            self.run_dir, acc, keep_last=cfg.checkpoint.keep_last,
            recipe={k: v for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in skip)},
            recipe_fingerprint=recipe_fingerprint(cfg), data_fingerprint=pre.data_fingerprint,
        )
        for obj in (self.state, self.data) + ((self.ema,) if self.ema is not None else ()):
            acc.register_for_checkpointing(obj)
        register_state_hooks(acc, self.model, self.algorithm)
        marker = self.checkpoints.resume(cfg.checkpoint.resume, allow_recipe_change=cfg.checkpoint.allow_recipe_change)
        if marker is not None:
            self.state.resumed_from_step = self.state.step
            self._log(f"resumed from step {self.state.step}", logging.INFO)
        self._is_setup = True

    # ------------------------------------------------------------------ one update
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Full trainable weights by name (gathered from ZeRO-3 / FSDP partitions) on the CPU, fp32."""
        acc = self.accelerator
        unwrapped = acc.unwrap_model(self.model)
        names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
        if self.sharding == "fsdp":
            full = acc.get_state_dict(self.model)
            return {n: full[n].detach().cpu().float().clone() for n in names if n in full}
        with acc_lib.gathered_parameters(self.sharding, self.params):
            named = dict(unwrapped.named_parameters())
            return {n: named[n].detach().cpu().float().clone() for n in names}

    def _update(self, buffer: MetricBuffer) -> bool:
        """One optimizer update (metrics added to ``buffer``); False if it was skipped for a retry."""
        acc, cfg = self.accelerator, self.config
        acc_lib.reset_peak_memory(acc.device)
        t0 = time.perf_counter()
        update = MetricBuffer()  # this update's metrics: dropped if the update is skipped
        for _ in range(self.pre.accumulation):  # type: ignore[union-attr]
            update.add(self.algorithm.train_step(self.data.next_batch()), acc.device)
        if not acc.sync_gradients:
            raise RuntimeError(
                f"algorithm {self.algorithm.name!r} made fewer micro-steps than micro_steps_per_batch="
                f"{self.algorithm.micro_steps_per_batch} promised (gradients were not synchronised)"
            )
        max_norm = cfg.optim.max_grad_norm
        grad_norm = acc.clip_grad_norm_(self.params, max_norm if max_norm else math.inf)
        flags = self.guard.flags(update.latest("loss"), grad_norm, update.rewards())
        if cfg.train.max_retries > 0 and bool(flags.any()):
            self.optimizer.zero_grad(set_to_none=True)
            self.state.retries += 1
            self._log(f"non-finite values in the update after step {self.state.step}: skipped "
                           f"(retry {self.state.retries}/{cfg.train.max_retries})", logging.WARNING)
            if self.state.retries > cfg.train.max_retries:
                self.guard.record(self.state.step + 1, flags)
                self.guard.check(acc)
            return False
        self.state.retries = 0
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.guard.record(self.state.step, flags)
        if self.ema is not None:
            self.ema.step(self.state.step)
        extra: dict[str, Any] = {
            "lr": self.lr_scheduler.get_last_lr()[0],
            "epoch": self.data.epoch_progress,
            "step_time_s": time.perf_counter() - t0,
            "peak_mem_gb": acc_lib.peak_memory_gb(acc.device),
        }
        if grad_norm is not None:
            extra["grad_norm"] = grad_norm
        if self.ema is not None and self.ema.model.cur_decay_value is not None:  # None before its first update
            extra["ema_decay"] = self.ema.model.cur_decay_value
        update.add(extra, acc.device)
        buffer.merge(update)
        return True

    # ------------------------------------------------------------------ evaluation, checkpoints, final
    def evaluate(self) -> EvalResult | None:
        """Evaluate with the EMA weights swapped in; logs and returns the result (complete on the main process)."""
        self.guard.check(self.accelerator)
        self._last_eval_step = self.state.step
        swap = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        with swap:
            result = self.algorithm.evaluate(self.state.step)
        if result is None or not self.accelerator.is_main_process or not result.metrics:
            return result
        self.tracker.log(result.metrics, step=self.state.step)
        grid = None
        if result.grid is not None:
            from PIL import Image

            with Image.open(result.grid) as img:
                grid = img.copy()
        self.tracker.log_eval("eval", grid, result.table, self.state.step,
                              caption=" | ".join(f"{r.get('prompt', '')[:40]}" for r in result.table[:16]) or None)
        self._headline = list(result.headline)
        keys = result.headline or sorted(result.metrics)
        self._log(f"eval @ step {self.state.step}: " + ", ".join(
            f"{k.split('/', 1)[-1]} {result.metrics[k]:.4f}" for k in keys if k in result.metrics), logging.INFO)
        self.state.history.append({"step": float(self.state.step), **result.metrics})
        return result

    def save_checkpoint(self) -> Path:
        self.guard.check(self.accelerator)  # never checkpoint (and rotate) after a non-finite value
        extra = None
        if getattr(self.algorithm, "exports_checkpoints", False):  # e.g. the reward model in its released layout
            swap = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
            with swap:
                state = self._trainable_state()

            def extra(folder: Path) -> None:
                self.algorithm.save_final(folder / "model", state)

        path = self.checkpoints.save(self.state.step, meta={"algorithm": self.algorithm.name}, extra=extra)
        self._log(f"checkpoint saved: {path}", logging.INFO)
        return path

    def save_final(self) -> tuple[Path, str]:
        """The trained weights (EMA if enabled), staged in ``run_dir/.tmp_final`` (``train`` adds the model card
        and moves it into place as ``run_dir/final``, so a crash never leaves a half-written ``final``)."""
        staged = self.run_dir / ".tmp_final"
        swap = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        with swap:
            state = self._trainable_state()
        fmt = ""
        if self.accelerator.is_main_process:
            shutil.rmtree(staged, ignore_errors=True)
            fmt = self.algorithm.save_final(staged, state)
        self.accelerator.wait_for_everyone()
        return staged, fmt

    # ------------------------------------------------------------------ the loop
    def _log_metrics(self, buffer: MetricBuffer, bar: Any, print_every: int) -> None:
        self.guard.check(self.accelerator)
        values = buffer.reduce(self.accelerator)
        metrics = {(f"perf/{k}" if k in ("step_time_s", "peak_mem_gb") else f"train/{k}"): v for k, v in values.items()}
        self.tracker.log(metrics, step=self.state.step)
        loss = values.get("loss", float("nan"))
        shown = self.algorithm.progress_metric
        postfix = {"loss": f"{loss:.4f}"}
        if shown and shown in values:
            postfix[shown.split("_mean")[0]] = f"{values[shown]:.3f}"
        bar.set_postfix(postfix)
        if self.state.step % print_every == 0:
            parts = [f"step {self.state.step}/{self.config.train.max_steps}", f"loss {loss:.4f}"]
            if shown and shown in values:
                parts.append(f"{shown.split('_mean')[0]} {values[shown]:.3f}")
            if "grad_norm" in values:
                parts.append(f"grad {values['grad_norm']:.3g}")
            parts.append(f"{values.get('step_time_s', float('nan')):.2f} s/step")
            self._log(" | ".join(parts), logging.INFO)

    def train(self) -> TrainSummary:
        """Run the whole training; returns (and on the main process prints) the summary.

        Raises:
            TrainingDiverged: a non-finite loss, gradient norm or reward (the last good checkpoint is kept).
        """
        from tqdm.auto import tqdm

        if not self._is_setup:
            self.setup()
        cfg, acc, st = self.config, self.accelerator, self.state
        t_start = time.perf_counter()
        self.tracker.start(config_to_dict(cfg), resumed_step=st.step)
        stop: str | None = None
        grid: Path | None = None
        try:
            if self._eval_setting("at_start") and st.step == 0:
                result = self.evaluate()
                if result is not None:
                    st.eval_before = dict(result.metrics)
                    grid = result.grid or grid
            bar = tqdm(total=cfg.train.max_steps, initial=st.step, desc=f"train {self.algorithm.name}",
                       disable=not (self.progress and acc.is_main_process), dynamic_ncols=True)
            print_every = max(cfg.train.log_every, cfg.train.max_steps // 10, 1)
            buffer = MetricBuffer()
            while st.step < cfg.train.max_steps:
                if not self._update(buffer):
                    continue
                bar.update(1)
                last = st.step == cfg.train.max_steps
                if st.step % cfg.train.log_every == 0 or last:
                    self._log_metrics(buffer, bar, print_every)
                every = self._eval_setting("every")
                if (every and st.step % every == 0) or (last and self._eval_setting("at_end")):
                    result = self.evaluate()
                    if result is not None:
                        st.eval_after = dict(result.metrics)
                        grid = result.grid or grid
                        if result.stop and not last:
                            stop = result.stop
                if cfg.checkpoint.every and st.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                if stop:
                    self._log(f"stopping at step {st.step}: {stop}", logging.WARNING)
                    break
            bar.close()
            self.guard.check(acc)
            if self._eval_setting("at_end") and self._last_eval_step != st.step:
                result = self.evaluate()
                if result is not None:
                    st.eval_after = dict(result.metrics)
                    grid = result.grid or grid
            staged, fmt = self.save_final()
        finally:
            self.tracker.finish()
        final = self.run_dir / "final"
        summary = TrainSummary(
            run_dir=str(self.run_dir), steps=st.step, resumed_from_step=st.resumed_from_step,
            time_s=time.perf_counter() - t_start, eval_before=st.eval_before, eval_after=st.eval_after,
            headline=self._headline, final_dir=str(final), final_format=fmt,
            eval_grid=str(grid) if grid else None, stopped_early=stop,
        )
        if acc.is_main_process:
            card = self.algorithm.model_card(asdict(summary))
            if card:
                (staged / "README.md").write_text(card)
            replace_folder(staged, final)
            write_atomic(self.run_dir / "summary.json",
                         json.dumps({**asdict(summary), "eval_history": st.history}, indent=2, default=str))
            self._log(summary.format(), logging.INFO)
        acc.wait_for_everyone()
        return summary

    def _log(self, message: str, level: int = logging.INFO) -> None:
        """Log on the main process only."""
        acc = getattr(self, "accelerator", None)
        if acc is None or acc.is_main_process:
            logger.log(level, message)

    def _eval_setting(self, key: str) -> Any:
        section = getattr(self.config, "eval", None)
        return getattr(section, key, None) if section is not None else None
