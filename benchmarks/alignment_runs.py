"""One alignment run of the experiment: ReFL or GRPO on the colour world with one of its rewards.

A run is the one Trainer on a recipe from :func:`dinalrm_align.demo.recipes.refl_recipe` (GRPO: its
``algorithm`` section swapped), with the algorithm subclassed (:func:`run_algorithm`) so that

* its reward is the chosen one (latent u=0.4, ensemble, pixel, sign-flipped, random; see
  :mod:`benchmarks.alignment_rewards`);
* every evaluation also measures the GOLDEN reward of the held-out prompts (same start noise as the
  trainer's evaluation, the policy's current EMA weights): ``eval/golden``. The golden reward is never a
  trainer proxy, so it cannot drive early stopping; early stopping (``eval.stop_on_hacking``) watches a
  held-out proxy, the pixel reward model;
* the FLOPs of its first update are counted with ``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Env", "RunSpec", "run_algorithm", "run_one", "spearman"]


@dataclass
class RunSpec:
    """What varies between runs (see the module docstring).

    ``reward``: ``latent`` (the base latent RM), ``latent_more`` (trained on more pairs), ``pixel``,
    ``random`` (an untrained random tiny latent RM), ``flipped`` (minus the base latent RM).
    """

    name: str
    algorithm: str = "refl"
    reward: str = "latent"
    ensemble: bool = False
    weight_decay: float = 0.0
    fm_lambda: float = 0.0
    early_stop: bool = False
    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-2
    eval_every: int = 10
    lora_targets: list[str] | None = None
    n_noise: int = 1


@dataclass
class Env:
    """What every run shares: the world config and objects, the reward-model folders, the pixel reward model
    (and its saved file, the early-stopping proxy), the flow-matching regulariser's latent dataset."""

    cfg: Any
    world: Any
    out: Path
    rm_dirs: dict[str, str]
    pixel_model: Any = None
    pixel_path: str | None = None
    fm_dataset: str | None = None
    grpo: dict[str, Any] = field(default_factory=dict)


def spearman(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 points or a constant series."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3 or a.size != b.size:
        return float("nan")

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(x.size)
        r[order] = np.arange(x.size, dtype=np.float64)
        for value in np.unique(x):  # average ties
            tie = x == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _make_reward(env: Env, spec: RunSpec) -> Any:
    from benchmarks.alignment_rewards import EnsembleReward, PixelReward, SignFlippedReward, pooled_text

    def make(ctx: Any) -> Any:
        if spec.reward == "pixel":
            text = pooled_text(ctx.pipeline, ctx.config.sampling.max_sequence_length)
            return PixelReward(env.pixel_model, ctx.pipeline, ctx.adapter, text)
        reward = ctx.reward
        if spec.ensemble:
            reward = EnsembleReward(reward)
        if spec.reward == "flipped":
            reward = SignFlippedReward(reward)
        return reward

    return make


def run_algorithm(env: Env, spec: RunSpec) -> type:
    """The algorithm class of a run: reward swapped, golden measured at every evaluation, first update's FLOPs."""
    from benchmarks.alignment_rewards import with_reward
    from dinalrm_align.algorithms.registry import resolve_algorithm
    from dinalrm_align.demo.world import decode

    base = with_reward(resolve_algorithm(spec.algorithm), _make_reward(env, spec))
    cfg, world = env.cfg, env.world

    class Experiment(base):  # type: ignore[misc, valid-type]
        flops_first_update: int | None = None

        def train_step(self, prompts: list[str]) -> dict[str, Any]:
            if self.flops_first_update is not None:
                return super().train_step(prompts)
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                out = super().train_step(prompts)
            self.flops_first_update = int(counter.get_total_flops())
            return out

        def evaluate(self, step: int) -> Any:
            from dinalrm_align.demo.pairs import sample_policy

            result = super().evaluate(step)
            ctx = self.ctx
            prompts = self.evaluator.prompts
            seeds = [self.evaluator.config.seed + i for i in range(len(prompts))]
            with torch.no_grad():
                latents = sample_policy(ctx.pipeline, prompts, seeds, latent_shape=tuple(ctx.latent_shape),
                                        num_steps=cfg.num_steps, max_sequence_length=cfg.max_sequence_length,
                                        transformer=ctx.transformer, batch_size=64)
            golden = world.optics.golden(decode(ctx.pipeline, latents), prompts)
            self.last_golden = golden
            if result is not None:
                result.metrics["eval/golden"] = float(golden.mean())
            return result

    return Experiment


def _recipe(env: Env, spec: RunSpec, seed: int, run_dir: Path) -> dict[str, Any]:
    from dinalrm_align.demo.recipes import refl_recipe

    cfg = env.cfg
    rm_dir = {"random": f"tiny:{1000 + seed}" if cfg.backbone == "sd3" else f"tiny-{cfg.backbone}:{1000 + seed}",
              "pixel": env.rm_dirs["latent"], "flipped": env.rm_dirs["latent"]}.get(spec.reward) \
        or env.rm_dirs[spec.reward]
    proxies = []
    if spec.early_stop:
        proxies.append({"name": "pixel_proxy", "target": "benchmarks.alignment_rewards:pixel_proxy_factory",
                        "factory": True, "kwargs": {"path": str(env.pixel_path), "backbone": cfg.backbone,
                                                    "seed": cfg.seed, "max_sequence_length": cfg.max_sequence_length}})
    sections: dict[str, Any] = {
        "seed": seed,
        "optim": {"lr": spec.lr, "weight_decay": spec.weight_decay, "max_grad_norm": 1.0},
        "train": {"max_steps": spec.steps, "batch_size": spec.batch_size, "mixed_precision": "no",
                  "num_threads": cfg.num_threads, "log_every": 1},
        "eval": {"every": spec.eval_every, "proxy_rewards": proxies, "stop_on_hacking": spec.early_stop,
                 "hacking_margin": 0.1},
    }
    if spec.n_noise != 1:
        sections["reward"] = {"n_noise": spec.n_noise}
    if spec.lora_targets:
        rank = cfg.refl_lora_rank
        sections["model"] = {"lora": {"r": rank, "alpha": 2 * rank, "target_modules": list(spec.lora_targets)}}
    recipe = refl_recipe(cfg, env.out, env.world, rm_dir, run_name=str(run_dir.relative_to(env.out)), **sections)
    if spec.algorithm == "grpo":  # the whole section is replaced
        recipe["algorithm"] = {"name": "grpo", **env.grpo}
    elif spec.fm_lambda > 0:
        recipe["algorithm"] = {**recipe["algorithm"], "fm_lambda": spec.fm_lambda, "fm_dataset": env.fm_dataset}
    return recipe


def run_one(env: Env, spec: RunSpec, seed: int) -> dict[str, Any]:
    """Train one run; returns its measured numbers (golden / learned before and after, curves, FLOPs, time)."""
    from dinalrm_align.trainer.loop import Trainer
    from dinalrm_align.trainer.recipe import load_recipe
    from dinalrm_align.trainer.tracking import read_metrics

    run_dir = env.out / "runs" / re.sub(r"[^A-Za-z0-9.=+-]+", "_", spec.name).strip("_") / f"seed{seed}"
    config = load_recipe(_recipe(env, spec, seed, run_dir))
    algo = run_algorithm(env, spec)(config.algorithm)
    trainer = Trainer(config, algorithm=algo, progress=False)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows = read_metrics(config.run_dir)
    evals = [r for r in rows if "eval/golden" in r]
    update_s = float(sum(r.get("perf/step_time_s", 0.0) for r in rows))
    golden_curve = [float(r["eval/golden"]) for r in evals]
    learned_curve = [float(r["eval/reward_raw"]) for r in evals]
    return {
        "spec": asdict(spec),
        "seed": seed,
        "steps": summary.steps,
        "stopped_early": summary.stopped_early,
        "golden_before": golden_curve[0],
        "golden_after": golden_curve[-1],
        "golden_after_per_prompt": algo.last_golden.tolist(),
        "learned_before": learned_curve[0],
        "learned_after": learned_curve[-1],
        "eval_steps": [int(r["step"]) for r in evals],
        "golden_curve": golden_curve,
        "learned_curve": learned_curve,
        "spearman_golden_learned": spearman(golden_curve, learned_curve),
        "flops_per_update": algo.flops_first_update,
        "update_wall_s": update_s,
        "run_wall_s": wall,
        "run_cpu_s": cpu,
        "batch_size": spec.batch_size,
    }
