"""``dinalrm-align demo``: the colour world, the whole loop on the tiny built-in models in minutes.

Stages (every number in the final report, and every time printed, is measured in this run):

1. world   -- tiny pipeline, prompts "a <colour> <object>" (8 colours x 14 objects), a held-out prompt
              split, the colour optics and the golden reward (:mod:`.world`).
2. pairs   -- policy samples + tinted variants, golden rewards, simulated Thurstone annotator,
              parquet pair shards for training and for held-out evaluation (:mod:`.pairs`).
3. reward  -- a tiny latent reward model trained by the one Trainer (``algorithm: reward_model``:
              noise-calibrated Thurstone loss, shared noise per pair, LoRA + head, EMA), then its
              pairwise accuracy on the held-out pairs per noise level u and for the {0.2, 0.5, 0.7} ensemble.
4. align   -- ReFL on the tiny policy (LoRA) with the same Trainer (``algorithm: refl``), the learned
              reward model as the reward and the golden reward as an evaluation-only proxy on held-out prompts.
5. report  -- golden and learned reward before/after on held-out prompts, ``curves.png``,
              ``before_after.png`` (captioned grid) and ``report.json``.

The golden reward is never seen by the reward model or the policy: it only labels the pairs
(through the noisy annotator) and measures the outcome.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.demo.config import BACKBONES, ColourWorldConfig

__all__ = ["ColourWorldConfig", "build_parser", "main", "run"]


class StageTimer:
    """Measured wall-clock and CPU (this process) seconds per stage."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.times: dict[str, dict[str, float]] = {}
        self._start = (time.perf_counter(), time.process_time())

    def run(self, name: str, label: str, fn: Callable[[], Any]) -> Any:
        if self.progress:
            print(f"[colour world] {label} ...", file=sys.stderr, flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.times[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        if self.progress:
            print(f"[colour world] {label}: {self.times[name]['wall_s']:.1f} s", file=sys.stderr, flush=True)
        return result

    def total(self) -> dict[str, dict[str, float]]:
        wall, cpu = self._start
        return {**self.times, "total": {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}}


def run(cfg: ColourWorldConfig) -> dict[str, Any]:
    """Run every stage; returns (and writes) the report."""
    from dinalrm_align.demo import stages
    from dinalrm_align.demo.report import build_report, write_pictures

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer(cfg.progress)
    world = timer.run("world", "1/5 world", lambda: stages.build_world(cfg, out))
    pairs = timer.run("pairs", "2/5 pairs", lambda: stages.build_pairs_stage(cfg, world))
    rm = timer.run("reward_model", "3/5 reward model", lambda: stages.stage_reward_model(cfg, out, pairs))
    align = timer.run("align", "4/5 align (ReFL)", lambda: stages.stage_align(cfg, out, world, rm.final_dir))

    def report_stage() -> tuple[dict[str, Any], dict[str, str]]:
        ba = stages.before_after(cfg, world, align)
        title = f"Colour world ({cfg.backbone}, seed {cfg.seed})"
        return ba, write_pictures(out, align, rm, ba, world.optics, title)

    ba, pictures = timer.run("report", "5/5 report", report_stage)
    return build_report(cfg, world, pairs, rm, align, ba, pictures, timer.total())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinalrm-align demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/colour_world", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", choices=BACKBONES, default="sd3", help="tiny pipeline family")
    p.add_argument("--quick", action="store_true", help="reduced size (smoke test; measured 10 s on 2 CPU cores)")
    p.add_argument("--rm-steps", type=int, help="reward-model training steps")
    p.add_argument("--refl-steps", type=int, help="ReFL steps")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine a second thread mostly waits)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    from dinalrm_align.demo.report import format_summary

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        factory = ColourWorldConfig.quick if args.quick else ColourWorldConfig
        cfg = factory(out_dir=args.out, seed=args.seed, backbone=args.backbone)
        if args.rm_steps is not None:
            cfg.rm_steps = args.rm_steps
        if args.refl_steps is not None:
            cfg.refl_steps = args.refl_steps
        cfg.num_threads = args.threads
        cfg.progress = not args.quiet
        cfg.__post_init__()
        report = run(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dinalrm-align demo: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(report))
    return 0
