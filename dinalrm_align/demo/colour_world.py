"""``dinalrm-align demo``: the colour world, the whole loop on the tiny built-in models in minutes.

Stages (each with its own progress bar; every number in the final report is measured here):

1. world   -- tiny SD3.5-style pipeline, prompts "a <colour> <object>" (8 colours x 14 objects),
              a held-out prompt split, the colour optics and the golden reward (:mod:`.world`).
2. pairs   -- policy samples + tinted variants, golden rewards, simulated Thurstone annotator,
              parquet pair shards for training and for held-out evaluation (:mod:`.pairs`).
3. reward  -- a tiny latent reward model trained with ``rm_training`` (noise-calibrated Thurstone
              fidelity loss, shared noise per pair, LoRA + head, EMA), then pairwise accuracy on the
              held-out pairs per noise level u and for the {0.2, 0.5, 0.7} ensemble.
4. align   -- ReFL on the tiny policy (LoRA) with the shared trainer, the learned reward model as
              the reward and the golden reward as an evaluation-only proxy on held-out prompts.
5. report  -- golden reward before/after on held-out prompts, curves + before/after image grid
              (PNG), ``report.json``.

The golden reward is never seen by the reward model or the policy: it only labels the pairs
(through the noisy annotator) and measures the outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ColourWorldConfig:
    """Sizes and hyper-parameters of the demo (defaults: the full demo, < 5 min on 2 CPU cores)."""

    out_dir: str = "runs/colour_world"
    seed: int = 0
    colours: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"])
    objects: list[str] | None = None
    num_eval_prompts: int = 24
    resolution: int = 32
    max_sequence_length: int = 8
    num_steps: int = 4
    # pairs
    tint_size: float = 1.0
    colour_contrast: float = 0.45
    seeds_per_prompt: int = 4
    eval_seeds_per_prompt: int = 2
    tints_per_latent: int = 5
    pairs_per_prompt: int = 48
    eval_pairs_per_prompt: int = 24
    distractor_offset: float = 0.5
    distractor_pattern: float = 0.3
    min_gap: float = 0.1
    label_noise: float = 0.02
    # reward model
    rm_layers: int = 4
    rm_steps: int = 600
    rm_init_noise: float = 0.05
    rm_batch_size: int = 32
    rm_lr: float = 5e-3
    rm_ema_decay: float = 0.9
    eval_us: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    eval_ensemble: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.7])
    eval_max_pairs: int = 600
    # alignment
    refl_steps: int = 100
    refl_batch_size: int = 16
    refl_lr: float = 1e-2
    refl_lora_rank: int = 8
    refl_eval_every: int = 20
    refl_targets: list[str] | None = None
    refl_u: float = 0.4
    refl_last_steps: int = 1
    refl_ema_decay: float = 0.9
    refl_n_noise: int = 1
    num_threads: int | None = 2
    progress: bool = True

    @classmethod
    def quick(cls, out_dir: str, seed: int = 0) -> ColourWorldConfig:
        """A reduced size for tests (< ~1 minute; the accuracy target is not expected to hold)."""
        return cls(
            out_dir=out_dir, seed=seed, colours=["red", "green", "blue", "white"], objects=["cube", "ball", "car", "tree"],
            num_eval_prompts=4, seeds_per_prompt=2, eval_seeds_per_prompt=1, tints_per_latent=3, rm_layers=2, rm_steps=30,
            rm_batch_size=16, eval_us=[0.4, 0.7], eval_max_pairs=64, refl_steps=4, refl_batch_size=4, refl_eval_every=2,
        )


def _stage(name: str, cfg: ColourWorldConfig) -> None:
    if cfg.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"[colour world] {name}")


def _bar(cfg: ColourWorldConfig, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not cfg.progress, dynamic_ncols=True, leave=True)


# ---------------------------------------------------------------------------------------------- stages
def stage_world(cfg: ColourWorldConfig, out: Path) -> dict[str, Any]:
    """Pipeline, prompt split, optics."""
    from dinalrm_align.demo.pairs import sample_policy
    from dinalrm_align.demo.world import OBJECTS, fit_optics, make_prompts
    from dinalrm_align.testing import tiny_sd3_pipeline

    bar = _bar(cfg, 3, "1/5 world")
    pipe = tiny_sd3_pipeline(cfg.seed)
    if cfg.resolution % (2 * pipe.vae_scale_factor):
        raise ValueError(f"resolution must be a multiple of {2 * pipe.vae_scale_factor}, got {cfg.resolution}")
    side = cfg.resolution // pipe.vae_scale_factor
    latent_shape = (int(pipe.transformer.config.in_channels), side, side)
    prompts = make_prompts(cfg.colours, cfg.objects or OBJECTS)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    if not 0 < cfg.num_eval_prompts < len(prompts):
        raise ValueError(f"num_eval_prompts must be in [1, {len(prompts) - 1}], got {cfg.num_eval_prompts}")
    eval_prompts = sorted((prompts[i] for i in order[: cfg.num_eval_prompts]), key=prompts.index)
    train_prompts = [p for p in prompts if p not in set(eval_prompts)]
    bar.update(1)
    probe = sample_policy(
        pipe, train_prompts[:16], [10_000 + i for i in range(min(16, len(train_prompts)))], latent_shape=latent_shape,
        num_steps=cfg.num_steps, max_sequence_length=cfg.max_sequence_length,
    )
    bar.update(1)
    optics = fit_optics(pipe, probe, cfg.tint_size, generator=g, calibrated_std=cfg.colour_contrast)
    optics_path = optics.save(out / "world" / "optics.json")
    (out / "world" / "train_prompts.txt").write_text("\n".join(train_prompts) + "\n")
    (out / "world" / "eval_prompts.txt").write_text("\n".join(eval_prompts) + "\n")
    bar.update(1)
    bar.close()
    return {
        "pipe": pipe, "optics": optics, "optics_path": optics_path, "latent_shape": latent_shape,
        "train_prompts": train_prompts, "eval_prompts": eval_prompts,
    }


def stage_pairs(cfg: ColourWorldConfig, out: Path, world: dict[str, Any]) -> dict[str, Any]:
    """Training and held-out pair shards."""
    from dinalrm_align.demo.pairs import build_pairs, sample_policy
    from dinalrm_align.rm_training.data import write_shard

    pipe, optics = world["pipe"], world["optics"]
    splits = {
        "train": (world["train_prompts"], cfg.seeds_per_prompt, 0, cfg.pairs_per_prompt),
        "eval": (world["eval_prompts"], cfg.eval_seeds_per_prompt, 500_000, cfg.eval_pairs_per_prompt),
    }
    bar = _bar(cfg, 4, "2/5 pairs")
    result: dict[str, Any] = {}
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for name, (prompts, per_prompt, seed_base, n_pairs) in splits.items():
        group_prompts = [p for p in prompts for _ in range(per_prompt)]
        seeds = [cfg.seed * 7919 + seed_base + i for i in range(len(group_prompts))]
        latents = sample_policy(
            pipe, group_prompts, seeds, latent_shape=world["latent_shape"], num_steps=cfg.num_steps,
            max_sequence_length=cfg.max_sequence_length,
        )
        bar.update(1)
        pairs = build_pairs(
            pipe, optics, latents, group_prompts, tints_per_latent=cfg.tints_per_latent, pairs_per_prompt=n_pairs,
            min_gap=cfg.min_gap, label_noise=cfg.label_noise, generator=g, height=cfg.resolution,
            width=cfg.resolution, distractor_offset=cfg.distractor_offset, distractor_pattern=cfg.distractor_pattern,
        )
        if not pairs.records:
            raise ValueError(f"no {name} pairs left after the min_gap={cfg.min_gap} filter")
        folder = out / "pairs" / name
        for old in folder.glob("*.parquet") if folder.is_dir() else []:
            old.unlink()
        for i in range(0, len(pairs.records), 2000):
            write_shard(folder / f"part_{i // 2000:05d}.parquet", pairs.records[i : i + 2000])
        result[name] = {"folder": folder, "pairs": pairs, "stats": pairs.stats()}
        bar.update(1)
    bar.close()
    return result


def rm_train_config(cfg: ColourWorldConfig, out: Path, pairs: dict[str, Any]) -> dict[str, Any]:
    """The reward-model recipe of the demo (same keys as ``recipes/tiny_rm.yaml``)."""
    layers = cfg.rm_layers
    taps = [layers // 2, layers] if layers >= 4 else [layers]
    return {
        "run_dir": str(out / "reward_model"),
        "seed": cfg.seed,
        "model": {
            "pipeline": f"tiny:{cfg.seed}",
            "preset": "tiny",
            "architecture": {"num_transformer_layers": layers, "visual_head_idx": taps, "text_head_idx": taps},
            "max_sequence_length": cfg.max_sequence_length,
            "zero_init_noise": cfg.rm_init_noise,
        },
        "data": {"train": str(pairs["train"]["folder"]), "eval": str(pairs["eval"]["folder"])},
        "loss": {"name": "thurstone", "u_sampler": "logit_normal"},
        "optim": {"lr": cfg.rm_lr, "weight_decay": 0.01, "max_grad_norm": 1.0},
        "train": {"max_steps": cfg.rm_steps, "batch_size": cfg.rm_batch_size, "mixed_precision": "no",
                  "num_threads": cfg.num_threads, "log_every": 10},
        "ema": {"enabled": True, "decay": cfg.rm_ema_decay, "update_every": 1},
        "checkpoint": {"every": 0},
        "eval": {"every": 0, "at_start": False, "at_end": False},
        "tracking": {"log_with": "none"},
    }


def stage_reward_model(cfg: ColourWorldConfig, out: Path, world: dict[str, Any], pairs: dict[str, Any]) -> dict[str, Any]:
    """Train the tiny RM on the pairs, then accuracy per noise level on the held-out pairs."""
    import numpy as np

    from dinalrm_align.rm_training.config import load_rm_train_config
    from dinalrm_align.rm_training.data import PairDataset
    from dinalrm_align.rm_training.evaluate import EvalSettings, score_pairs
    from dinalrm_align.rm_training.train import RewardModelTrainer

    config = load_rm_train_config(rm_train_config(cfg, out, pairs))
    _stage("3/5 reward model", cfg)
    trainer = RewardModelTrainer(config, progress=cfg.progress)
    t0 = time.perf_counter()
    summary = trainer.train()
    train_time = time.perf_counter() - t0
    rm = trainer.reward_model.eval()
    dataset = PairDataset.from_source(pairs["eval"]["folder"])
    n = min(cfg.eval_max_pairs, len(dataset))
    settings = EvalSettings(us=tuple(cfg.eval_us), ensemble=tuple(cfg.eval_ensemble), seed=cfg.seed, batch_size=64)
    with torch.no_grad(), trainer.ema_weights():
        scores = score_pairs(rm, dataset, trainer.encode, settings, positions=np.arange(n))
    accuracy = scores.accuracy()
    agrees = np.asarray(pairs["eval"]["pairs"].agrees_with_golden[:n])
    golden_accuracy = {
        k: float(np.mean((scores.chosen[k] > scores.rejected[k]) == agrees)) for k in scores.chosen
    }
    return {
        "final_dir": summary.final_dir,
        "train_time_s": train_time,
        "steps": summary.steps,
        "num_eval_pairs": n,
        "accuracy": accuracy,
        "accuracy_vs_golden_order": golden_accuracy,
        "trainer": trainer,
    }


def refl_config(cfg: ColourWorldConfig, out: Path, world: dict[str, Any], rm_dir: str) -> dict[str, Any]:
    """The ReFL recipe of the demo (the shared trainer; golden reward as an eval-only proxy)."""
    k = cfg.num_steps
    return {
        "run_dir": str(out / "refl"),
        "seed": cfg.seed,
        "algorithm": {"name": "refl", "k_min": max(0, k - cfg.refl_last_steps), "k_max": k - 1, "rollout_cfg": False},
        "model": {"pretrained": f"tiny:{cfg.seed}", "finetune": "lora",
                  "lora": {"r": cfg.refl_lora_rank, "alpha": 2 * cfg.refl_lora_rank,
                           **({"target_modules": cfg.refl_targets} if cfg.refl_targets else {})}},
        "reward": {"model": rm_dir, "u": cfg.refl_u, "n_noise": cfg.refl_n_noise},
        "sampling": {"resolution": cfg.resolution, "num_steps": k, "guidance_scale": 1.0,
                     "max_sequence_length": cfg.max_sequence_length},
        "data": {"prompts": str(out / "world" / "train_prompts.txt"),
                 "eval_prompts": str(out / "world" / "eval_prompts.txt"), "num_eval_prompts": len(world["eval_prompts"])},
        "optim": {"lr": cfg.refl_lr, "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"max_steps": cfg.refl_steps, "batch_size": cfg.refl_batch_size, "mixed_precision": "no",
                  "num_threads": cfg.num_threads, "log_every": 1},
        "ema": {"enabled": True, "decay": cfg.refl_ema_decay, "update_every": 1},
        "checkpoint": {"every": 0},
        "eval": {
            "every": cfg.refl_eval_every, "at_start": True, "at_end": True, "num_steps": k, "guidance_scale": 1.0,
            "batch_size": 32, "seed": 4321 + cfg.seed, "images": False,
            "proxy_rewards": [{"name": "golden", "target": "dinalrm_align.demo.world:golden_reward_factory",
                               "factory": True, "kwargs": {"optics": str(world["optics_path"])}}],
        },
        "tracking": {"log_with": "none"},
    }


def stage_align(cfg: ColourWorldConfig, out: Path, world: dict[str, Any], rm_dir: str) -> dict[str, Any]:
    """ReFL with the shared trainer; curves from its metrics log."""
    from dinalrm_align.trainer.config import load_train_config
    from dinalrm_align.trainer.loop import Trainer
    from dinalrm_align.trainer.tracking import read_metrics

    config = load_train_config(refl_config(cfg, out, world, rm_dir))
    _stage("4/5 align (ReFL)", cfg)
    t0 = time.perf_counter()
    summary = Trainer(config).train()
    rows = read_metrics(config.run_dir)
    return {
        "summary": summary,
        "train_time_s": time.perf_counter() - t0,
        "final_dir": summary.final_dir,
        "train_curve": [(r["step"], r["train/reward_raw_mean"]) for r in rows if "train/reward_raw_mean" in r],
        "eval_curve": [
            (r["step"], r["eval/reward_raw"], r["eval/proxy/golden"]) for r in rows if "eval/proxy/golden" in r
        ],
    }


def before_after(cfg: ColourWorldConfig, world: dict[str, Any], lora_dir: str) -> dict[str, Any]:
    """Held-out prompts sampled with the same seeds before and after alignment: latents, images, golden."""
    from dinalrm_align.demo.pairs import sample_policy
    from dinalrm_align.demo.world import decode
    from dinalrm_align.testing import tiny_sd3_pipeline

    prompts = world["eval_prompts"]
    seeds = [900_000 + cfg.seed * 7919 + i for i in range(len(prompts))]
    kwargs = {"latent_shape": world["latent_shape"], "num_steps": cfg.num_steps, "max_sequence_length": cfg.max_sequence_length}
    base = world["pipe"]
    before = sample_policy(base, prompts, seeds, **kwargs)
    aligned = tiny_sd3_pipeline(cfg.seed)
    aligned.load_lora_weights(lora_dir)
    after = sample_policy(aligned, prompts, seeds, **kwargs)
    images = {"before": decode(base, before), "after": decode(base, after)}
    optics = world["optics"]
    return {
        "prompts": prompts,
        "images": images,
        "golden": {k: optics.golden(v, prompts) for k, v in images.items()},
    }


def run(cfg: ColourWorldConfig) -> dict[str, Any]:
    """Run every stage; returns (and writes) the report."""
    from dinalrm_align.demo.plots import write_figure

    t_start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    world = stage_world(cfg, out)
    timings["world_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pairs = stage_pairs(cfg, out, world)
    timings["pairs_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rm = stage_reward_model(cfg, out, world, pairs)
    timings["reward_model_s"] = time.perf_counter() - t
    t = time.perf_counter()
    align = stage_align(cfg, out, world, rm["final_dir"])
    timings["align_s"] = time.perf_counter() - t

    t = time.perf_counter()
    bar = _bar(cfg, 2, "5/5 report")
    ba = before_after(cfg, world, align["final_dir"])
    bar.update(1)
    golden_before = float(ba["golden"]["before"].mean())
    golden_after = float(ba["golden"]["after"].mean())
    improved = float((ba["golden"]["after"] > ba["golden"]["before"]).float().mean())
    s = align["summary"]
    figure = write_figure(
        out / "colour_world.png", align["train_curve"], align["eval_curve"], ba, world["optics"],
        rm["accuracy"], title=f"Colour world (seed {cfg.seed})",
    )
    bar.update(1)
    bar.close()
    timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "config": asdict(cfg),
        "world": {
            "train_prompts": len(world["train_prompts"]),
            "eval_prompts": world["eval_prompts"],
            "optics": str(world["optics_path"]),
            "decoder_colour_singular_values": world["optics"].singular_values,
        },
        "pairs": {k: v["stats"] for k, v in pairs.items()},
        "reward_model": {
            "folder": rm["final_dir"],
            "steps": rm["steps"],
            "train_time_s": rm["train_time_s"],
            "num_eval_pairs": rm["num_eval_pairs"],
            "accuracy_per_u": rm["accuracy"],
            "accuracy_vs_golden_order_per_u": rm["accuracy_vs_golden_order"],
            "target_u0.4": 0.85,
            "meets_target_u0.4": rm["accuracy"].get("0.4", 0.0) >= 0.85,
        },
        "alignment": {
            "lora": align["final_dir"],
            "steps": s.steps,
            "train_time_s": align["train_time_s"],
            "learned_reward_before": s.eval_before.get("eval/reward_raw"),
            "learned_reward_after": s.eval_after.get("eval/reward_raw"),
            "golden_before_trainer_eval": s.eval_before.get("eval/proxy/golden"),
            "golden_after_trainer_eval": s.eval_after.get("eval/proxy/golden"),
            "eval_curve": [{"step": a, "reward_raw": b, "golden": c} for a, b, c in align["eval_curve"]],
        },
        "held_out": {
            "prompts": ba["prompts"],
            "golden_before": golden_before,
            "golden_after": golden_after,
            "golden_gain": golden_after - golden_before,
            "fraction_of_prompts_improved": improved,
            "golden_before_per_prompt": ba["golden"]["before"].tolist(),
            "golden_after_per_prompt": ba["golden"]["after"].tolist(),
        },
        "figure": str(figure),
        "timings": timings,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    report["report"] = str(out / "report.json")
    return report


def format_summary(report: dict[str, Any]) -> str:
    rm, al, ho = report["reward_model"], report["alignment"], report["held_out"]
    acc = rm["accuracy_per_u"]
    lines = [
        "colour world finished",
        f"  pairs            train {report['pairs']['train']['pairs']}, held-out {report['pairs']['eval']['pairs']} "
        f"(annotator agrees with golden order on {100 * report['pairs']['eval']['label_agreement_with_golden']:.1f} %)",
        "  reward model     held-out pairwise accuracy: "
        + ", ".join(f"u={k} {100 * v:.1f}%" for k, v in acc.items()),
        f"                   u=0.4: {100 * acc.get('0.4', float('nan')):.1f}% (target >= 85%: "
        f"{'met' if rm['meets_target_u0.4'] else 'NOT met'})",
        f"  ReFL             {al['steps']} steps; learned reward {al['learned_reward_before']:.3f} -> {al['learned_reward_after']:.3f}",
        f"  golden reward    held-out prompts {ho['golden_before']:.4f} -> {ho['golden_after']:.4f} "
        f"({ho['golden_gain']:+.4f}; {100 * ho['fraction_of_prompts_improved']:.0f}% of prompts improved)",
        f"  time             {report['timings']['total_s']:.0f} s",
        f"  figure           {report['figure']}",
        f"  report           {report['report']}",
        f"  reward model     {rm['folder']}",
        f"  policy LoRA      {al['lora']}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinalrm-align demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/colour_world", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="reduced size (smoke test, ~1 minute)")
    p.add_argument("--rm-steps", type=int, help="reward-model training steps")
    p.add_argument("--refl-steps", type=int, help="ReFL steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    cfg = ColourWorldConfig.quick(args.out, args.seed) if args.quick else ColourWorldConfig(out_dir=args.out, seed=args.seed)
    if args.rm_steps is not None:
        cfg.rm_steps = args.rm_steps
    if args.refl_steps is not None:
        cfg.refl_steps = args.refl_steps
    cfg.num_threads = args.threads
    cfg.progress = not args.quiet
    try:
        report = run(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dinalrm-align demo: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(report))
    return 0
