"""The colour world's stages: world, pairs, reward model, alignment, before/after (see :mod:`.colour_world`).

Every stage takes the demo config (:class:`~dinalrm_align.demo.config.ColourWorldConfig`) and what the
earlier stages returned; nothing is rebuilt twice: one tiny pipeline serves the world, the pairs and
the figures; the reward model and the policy are trained by the one :class:`~dinalrm_align.trainer.loop.Trainer`
(``algorithm: reward_model``, then ``algorithm: refl``), and the before/after samples reuse the
trained policy's own objects (LoRA disabled = before, EMA weights swapped in = after).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.demo.config import ColourWorldConfig
from dinalrm_align.demo.recipes import refl_recipe, rm_recipe

__all__ = [
    "AlignResult", "RewardModelResult", "World", "before_after", "build_pairs_stage", "build_world", "sample_held_out",
    "stage_align", "stage_reward_model",
]  # fmt: skip


@dataclass
class World:
    """The pipeline, optics and prompt split of one colour world."""

    pipe: Any
    optics: Any
    optics_path: Path
    latent_shape: tuple[int, int, int]
    train_prompts: list[str]
    eval_prompts: list[str]
    out: Path
    text_cache: Any = None


@dataclass
class RewardModelResult:
    """The trained reward model (``final_dir``, EMA weights) and its held-out pairwise accuracy per level."""

    final_dir: str
    steps: int
    train_time_s: float
    num_eval_pairs: int
    accuracy: dict[str, float]
    accuracy_vs_golden_order: dict[str, float]


@dataclass
class AlignResult:
    """The ReFL run: its (kept) trainer, summary, and curves ``(step, learned)`` / ``(step, learned, golden)``."""

    trainer: Any
    summary: Any
    train_time_s: float
    train_curve: list[tuple[float, float]] = field(default_factory=list)
    eval_curve: list[tuple[float, float, float]] = field(default_factory=list)


def build_world(cfg: ColourWorldConfig, out: Path) -> World:
    """Tiny pipeline of ``cfg.backbone``, prompt split (seeded), colour optics fitted on policy samples."""
    from dinalrm_align.backbones.registry import adapter_for
    from dinalrm_align.demo.pairs import sample_policy
    from dinalrm_align.demo.world import OBJECTS, fit_optics, make_prompts
    from dinalrm_align.reward_model.text import PromptEmbeddingCache
    from dinalrm_align.tiny import tiny_pipeline

    pipe = tiny_pipeline(cfg.backbone, cfg.seed)
    adapter = adapter_for(pipe)
    latent_shape = adapter.latent_shape(pipe, cfg.resolution, cfg.resolution)  # ValueError if it does not fit
    prompts = make_prompts(cfg.colours, cfg.objects or OBJECTS)
    if not 0 < cfg.num_eval_prompts < len(prompts):
        raise ValueError(f"num_eval_prompts must be in [1, {len(prompts) - 1}], got {cfg.num_eval_prompts}")
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    held = {prompts[i] for i in order[: cfg.num_eval_prompts]}
    eval_prompts = [p for p in prompts if p in held]
    train_prompts = [p for p in prompts if p not in held]
    cache = PromptEmbeddingCache()
    n_probe = min(16, len(train_prompts))
    probe = sample_policy(
        pipe, train_prompts[:n_probe], [10_000 + i for i in range(n_probe)], latent_shape=latent_shape,
        num_steps=cfg.num_steps, max_sequence_length=cfg.max_sequence_length, cache=cache,
    )
    optics = fit_optics(pipe, probe, cfg.tint_size, generator=g, calibrated_std=cfg.colour_contrast)
    folder = out / "world"
    optics_path = optics.save(folder / "optics.json")
    (folder / "train_prompts.txt").write_text("\n".join(train_prompts) + "\n")
    (folder / "eval_prompts.txt").write_text("\n".join(eval_prompts) + "\n")
    return World(pipe, optics, optics_path, latent_shape, train_prompts, eval_prompts, out, cache)


def build_pairs_stage(cfg: ColourWorldConfig, world: World, *, pairs_per_prompt: int | None = None,
                      seeds_per_prompt: int | None = None, folder: str = "pairs", seed_offset: int = 0) -> dict[str, Any]:
    """Training and held-out pair shards (parquet) from policy samples, tints and the simulated annotator.

    ``pairs_per_prompt`` / ``seeds_per_prompt`` override the config (e.g. a larger training set);
    ``seed_offset`` draws other policy samples and tints (an independent pair set).
    """
    from dinalrm_align.demo.pairs import build_pairs, sample_policy
    from dinalrm_align.rm_training.data import write_shard

    splits = {
        "train": (world.train_prompts, seeds_per_prompt or cfg.seeds_per_prompt, 0,
                  pairs_per_prompt or cfg.pairs_per_prompt),
        "eval": (world.eval_prompts, cfg.eval_seeds_per_prompt, 500_000, cfg.eval_pairs_per_prompt),
    }
    result: dict[str, Any] = {}
    g = torch.Generator().manual_seed(cfg.seed + 1 + 7 * seed_offset)
    for name, (prompts, per_prompt, seed_base, n_pairs) in splits.items():
        group_prompts = [p for p in prompts for _ in range(per_prompt)]
        seeds = [cfg.seed * 7919 + seed_base + 1_000_000 * seed_offset + i for i in range(len(group_prompts))]
        latents = sample_policy(
            world.pipe, group_prompts, seeds, latent_shape=world.latent_shape, num_steps=cfg.num_steps,
            max_sequence_length=cfg.max_sequence_length, cache=world.text_cache,
        )
        pairs = build_pairs(
            world.pipe, world.optics, latents, group_prompts, tints_per_latent=cfg.tints_per_latent,
            pairs_per_prompt=n_pairs, min_gap=cfg.min_gap, label_noise=cfg.label_noise, generator=g,
            height=cfg.resolution, width=cfg.resolution, distractor_offset=cfg.distractor_offset,
            distractor_pattern=cfg.distractor_pattern, tint_std=cfg.tint_std,
        )
        if not pairs.records:
            raise ValueError(f"no {name} pairs left after the min_gap={cfg.min_gap} filter")
        out_dir = world.out / folder / name
        for old in out_dir.glob("*.parquet") if out_dir.is_dir() else []:
            old.unlink()
        for i in range(0, len(pairs.records), 2000):
            write_shard(out_dir / f"part_{i // 2000:05d}.parquet", pairs.records[i : i + 2000])
        result[name] = {"folder": out_dir, "pairs": pairs, "stats": pairs.stats()}
    return result


def stage_reward_model(cfg: ColourWorldConfig, out: Path, pairs: dict[str, Any], *, run_name: str = "reward_model",
                       steps: int | None = None) -> RewardModelResult:
    """Train the tiny latent reward model with the one Trainer (``algorithm: reward_model``), then its
    held-out pairwise accuracy per noise level u and for the {0.2, 0.5, 0.7} ensemble (EMA weights)."""
    import time

    import numpy as np

    from dinalrm_align.rm_training.data import PairDataset
    from dinalrm_align.rm_training.evaluate import EvalSettings, score_pairs
    from dinalrm_align.trainer.loop import Trainer
    from dinalrm_align.trainer.recipe import load_recipe

    config = load_recipe(rm_recipe(cfg, out, pairs, run_name=run_name, steps=steps))
    trainer = Trainer(config, progress=cfg.progress)
    t0 = time.perf_counter()
    summary = trainer.train()
    train_time = time.perf_counter() - t0
    algo = trainer.algorithm
    dataset = PairDataset.from_source(pairs["eval"]["folder"])
    n = min(cfg.eval_max_pairs, len(dataset))
    settings = EvalSettings(us=tuple(cfg.eval_us), ensemble=tuple(cfg.eval_ensemble), seed=cfg.seed,
                            batch_size=cfg.rm_eval_batch_size)
    algo.rm.eval()
    swap = trainer.ema.swapped() if trainer.ema is not None else contextlib.nullcontext()
    with torch.no_grad(), swap:
        scores = score_pairs(algo.rm, dataset, algo.encode, settings, positions=np.arange(n))
    agrees = np.asarray(pairs["eval"]["pairs"].agrees_with_golden[:n])  # one latent size: scores keep this order
    golden_accuracy = {k: float(np.mean((scores.chosen[k] > scores.rejected[k]) == agrees)) for k in scores.chosen}
    return RewardModelResult(str(summary.final_dir), summary.steps, train_time, n, scores.accuracy(), golden_accuracy)


def stage_align(cfg: ColourWorldConfig, out: Path, world: World, rm_dir: str) -> AlignResult:
    """ReFL with the one Trainer; curves from its metrics log. The trainer is kept for :func:`before_after`."""
    import time

    from dinalrm_align.trainer.loop import Trainer
    from dinalrm_align.trainer.recipe import load_recipe
    from dinalrm_align.trainer.tracking import read_metrics

    config = load_recipe(refl_recipe(cfg, out, world, rm_dir))
    trainer = Trainer(config, progress=cfg.progress)
    t0 = time.perf_counter()
    summary = trainer.train()
    rows = read_metrics(config.run_dir)
    return AlignResult(
        trainer, summary, time.perf_counter() - t0,
        [(r["step"], r["train/reward_raw_mean"]) for r in rows if "train/reward_raw_mean" in r],
        [(r["step"], r["eval/reward_raw"], r["eval/proxy/golden"]) for r in rows if "eval/proxy/golden" in r],
    )


@torch.no_grad()
def sample_held_out(ctx: Any, prompts: Sequence[str], eval_seed: int, cfg: ColourWorldConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents (N, C, h, w), learned raw reward (N,))`` of the policy in ``ctx`` as it is now (ODE, no CFG),
    with the trainer's evaluation noise (start noise ``eval_seed + i``, reward noise ``eval_seed + 10_000_019 + i``),
    so the numbers equal the trainer's own evaluation of the same weights."""
    from dinalrm_align.demo.pairs import sample_policy

    latents = sample_policy(ctx.pipeline, prompts, [eval_seed + i for i in range(len(prompts))],
                            latent_shape=tuple(ctx.latent_shape), num_steps=cfg.num_steps,
                            max_sequence_length=cfg.max_sequence_length, transformer=ctx.transformer, batch_size=64)
    shape = (ctx.config.reward.n_noise, *ctx.reward_latent_shape)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(eval_seed + 10_000_019 + i))
                         for i in range(len(prompts))], dim=1)
    cond = ctx.encode(list(prompts))
    raw = ctx.score_reward(latents.to(ctx.device), cond, list(prompts), noise=noise.to(ctx.device))
    return latents, raw.float().cpu()


def before_after(cfg: ColourWorldConfig, world: World, align: AlignResult) -> dict[str, Any]:
    """The held-out prompts sampled by the base policy (LoRA disabled) and by the aligned one (EMA weights, as
    saved), with the trainer's evaluation noise: latents, decoded images, learned and golden reward of each."""
    from dinalrm_align.demo.world import decode

    trainer = align.trainer
    ctx = trainer.algorithm.ctx
    prompts = list(trainer.algorithm.evaluator.prompts)
    eval_seed = trainer.config.eval.seed
    transformer = ctx.transformer
    was_training = transformer.training
    transformer.eval()
    try:
        transformer.disable_adapters()
        try:
            before, r_before = sample_held_out(ctx, prompts, eval_seed, cfg)
        finally:
            transformer.enable_adapters()
        swap = trainer.ema.swapped() if trainer.ema is not None else contextlib.nullcontext()
        with swap:
            after, r_after = sample_held_out(ctx, prompts, eval_seed, cfg)
    finally:
        transformer.train(was_training)
    images = {"before": decode(world.pipe, before), "after": decode(world.pipe, after)}
    return {
        "prompts": prompts,
        "latents": {"before": before, "after": after},
        "images": images,
        "learned": {"before": r_before, "after": r_after},
        "golden": {k: world.optics.golden(v, prompts) for k, v in images.items()},
    }
