"""Command-line entry points: ``train-rm``, ``eval-rm`` and ``preprocess`` (each returns an exit code)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


def _fail(prog: str, exc: Exception) -> int:
    print(f"dinalrm-align {prog}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------------------------------------- train-rm
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dinalrm-align train-rm",
        description="Train a latent reward model on preference-pair shards (see recipes/rm_sd35m.yaml).",
    )
    p.add_argument("recipe", help="YAML recipe (recipes/rm_sd35m.yaml, recipes/tiny_rm.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--run-dir", help="shortcut for --set run_dir=DIR")
    p.add_argument("--resume", help="checkpoint folder or 'latest' (shortcut for --set checkpoint.resume=...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    from dinalrm_align.rm_training.config import load_rm_train_config

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        config = load_rm_train_config(args.recipe, overrides)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("train-rm", exc)
    from dinalrm_align.rm_training.train import train_reward_model

    try:
        train_reward_model(config, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("train-rm", exc)
    return 0


# ---------------------------------------------------------------------------------------------- eval-rm
def eval_parser() -> argparse.ArgumentParser:
    from dinalrm_align.rm_training.evaluate import DEFAULT_ENSEMBLE, DEFAULT_US

    p = argparse.ArgumentParser(
        prog="dinalrm-align eval-rm",
        description="Pairwise accuracy per noise level (ties count as wrong), calibration, JSON report + PNG plots.",
    )
    p.add_argument("--model", required=True, help="reward model folder or hub id (tiny[:SEED] for the tiny random one)")
    p.add_argument("--pipeline", default="stabilityai/stable-diffusion-3.5-medium",
                   help="SD3 pipeline for the text stack / base blocks / VAE (tiny[:SEED], folder or hub id)")
    p.add_argument("--pairs", help="latent pair shards (folder or .parquet)")
    p.add_argument("--ranked", help="jsonl of ranked sets {prompt, images: [paths], ranks: [1, 2, ...]}")
    p.add_argument("--out", required=True, help="output folder for report.json and the plots")
    p.add_argument("--us", default=",".join(f"{u:g}" for u in DEFAULT_US), help="noise levels (comma-separated)")
    p.add_argument("--ensemble", default=",".join(f"{u:g}" for u in DEFAULT_ENSEMBLE),
                   help="ensemble noise levels ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-noise", type=int, default=1, help="average scores over this many noise draws")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-pairs", type=int, default=None, help="evaluate at most this many pairs")
    p.add_argument("--max-sequence-length", type=int, default=128)
    p.add_argument("--calibrate", choices=["none", "temperature", "logistic"], default="temperature",
                   help="fit a calibration on half of the pairs, report before/after on the other half")
    p.add_argument("--calibration-u", default="0.4", help="noise level whose scores are calibrated ('ensemble' allowed)")
    p.add_argument("--save-calibrated", help="write the model with the fitted calibration here (released layout)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--quiet", action="store_true")
    return p


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def eval_main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    if not args.pairs and not args.ranked:
        return _fail("eval-rm", ValueError("give --pairs and/or --ranked"))
    from dinalrm_align.rm_training.report import EvalJob, run_evaluation

    try:
        job = EvalJob(
            model=args.model, pipeline=args.pipeline, pairs=args.pairs, ranked=args.ranked, out=Path(args.out),
            us=_floats(args.us), ensemble=_floats(args.ensemble) or None, seed=args.seed, n_noise=args.n_noise,
            batch_size=args.batch_size, max_pairs=args.max_pairs, max_sequence_length=args.max_sequence_length,
            calibrate=args.calibrate, calibration_level=args.calibration_u, save_calibrated=args.save_calibrated,
            device=args.device, progress=not args.quiet,
        )
        report = run_evaluation(job)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("eval-rm", exc)
    print(json.dumps(report["summary"], indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- preprocess
def preprocess_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dinalrm-align preprocess",
        description="Encode preference images into latent pair shards (aspect-ratio buckets, SD3 VAE, resumable).",
    )
    p.add_argument("source", help="jsonl of {prompt, chosen_path, rejected_path}, HPDv3 json, or Pick-a-Pic parquet(s)")
    p.add_argument("--out", required=True, help="output folder for part_XXXXX.parquet shards")
    p.add_argument("--layout", choices=["jsonl", "hpdv3", "pickapic"], default="jsonl")
    p.add_argument("--vae", default="stabilityai/stable-diffusion-3.5-medium",
                   help="VAE source: pipeline folder / hub id (vae subfolder), a VAE folder, or tiny[:SEED]")
    p.add_argument("--image-root", help="folder that relative image paths are relative to (default: the input's)")
    p.add_argument("--buckets", help="HxW list, e.g. 64x64,96x64 (default: the 13 SD3 buckets)")
    p.add_argument("--bucket-scale", type=float, default=1.0,
                   help="scale the buckets (e.g. 0.25 for a VAE with factor 2 instead of 8)")
    p.add_argument("--bucket-multiple", type=int, default=16, help="round scaled buckets to this multiple")
    p.add_argument("--min-size", type=int, default=256, help="drop pairs with an image side below this")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per shard")
    p.add_argument("--batch-size", type=int, default=8, help="images per VAE call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--quiet", action="store_true")
    return p


def preprocess_main(argv: list[str] | None = None) -> int:
    args = preprocess_parser().parse_args(argv)
    from dinalrm_align.rm_training.preprocess import (
        SD3_BUCKETS,
        PreprocessOptions,
        format_summary,
        parse_buckets,
        preprocess,
        scale_buckets,
    )

    try:
        buckets = parse_buckets(args.buckets) if args.buckets else list(SD3_BUCKETS)
        if args.bucket_scale != 1.0:
            buckets = scale_buckets(buckets, args.bucket_scale, args.bucket_multiple)
        options = PreprocessOptions(
            source=args.source, output=args.out, layout=args.layout, vae=args.vae, image_root=args.image_root,
            buckets=buckets, min_size=args.min_size, shard_size=args.shard_size, batch_size=args.batch_size,
            seed=args.seed, dtype=args.dtype, progress=not args.quiet,
        )
        summary = preprocess(options)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("preprocess", exc)
    print(format_summary(summary))
    return 0
