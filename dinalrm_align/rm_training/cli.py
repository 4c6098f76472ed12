"""Command-line entry points: ``train-rm``, ``eval-rm`` and ``preprocess`` (each returns an exit code)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _verbosity(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only, no progress bars")
    group.add_argument("--verbose", "-v", action="store_true", help="debug output and tracebacks on errors")


def _setup(args: argparse.Namespace) -> None:
    from dinalrm_align.logs import setup_logging

    setup_logging(-1 if args.quiet else 1 if args.verbose else 0)


# ---------------------------------------------------------------------------------------------- train-rm
def train_main(argv: list[str] | None = None) -> int:
    """``dinalrm-align train-rm RECIPE`` = ``dinalrm-align train RECIPE`` with ``algorithm: reward_model`` by default."""
    from dinalrm_align.trainer.cli import main

    return main(argv, default_algorithm="reward_model", prog="dinalrm-align train-rm")


# ---------------------------------------------------------------------------------------------- eval-rm
def eval_parser() -> argparse.ArgumentParser:
    from dinalrm_align.rm_training.evaluate import DEFAULT_ENSEMBLE, DEFAULT_US

    p = argparse.ArgumentParser(
        prog="dinalrm-align eval-rm",
        description="Pairwise accuracy per noise level (ties count as wrong), calibration, JSON report + PNG plots.",
    )
    p.add_argument("--model", required=True, help="reward model folder or hub id (tiny[:SEED] for the tiny random one)")
    p.add_argument("--pipeline", default=None,
                   help="pipeline for the text stack / base blocks / VAE (tiny id, folder or hub id; default: the "
                        "model's own base pipeline)")
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
    _verbosity(p)
    return p


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def eval_main(argv: list[str] | None = None) -> int:
    from dinalrm_align.errors import run_cli

    args = eval_parser().parse_args(argv)
    _setup(args)

    def body() -> int:
        if not args.pairs and not args.ranked:
            raise ValueError("give --pairs and/or --ranked")
        from dinalrm_align.reward_model.cli_score import default_pipeline
        from dinalrm_align.rm_training.report import EvalJob, run_evaluation

        pipeline = args.pipeline or default_pipeline(args.model)
        job = EvalJob(
            model=args.model, pipeline=pipeline, pairs=args.pairs, ranked=args.ranked, out=Path(args.out),
            us=_floats(args.us), ensemble=_floats(args.ensemble) or None, seed=args.seed, n_noise=args.n_noise,
            batch_size=args.batch_size, max_pairs=args.max_pairs, max_sequence_length=args.max_sequence_length,
            calibrate=args.calibrate, calibration_level=args.calibration_u, save_calibrated=args.save_calibrated,
            device=args.device, progress=not args.quiet,
        )
        report = run_evaluation(job)
        print(json.dumps(report["summary"], indent=2))
        return 0

    return run_cli("eval-rm", body, verbose=args.verbose)


# ---------------------------------------------------------------------------------------------- preprocess
def preprocess_parser() -> argparse.ArgumentParser:
    from dinalrm_align.rm_training.image_io import DEFAULT_MAX_PIXELS

    p = argparse.ArgumentParser(
        prog="dinalrm-align preprocess",
        description="Encode preference images into latent pair shards (aspect-ratio buckets, the --vae family's "
                    "VAE and normalisation, resumable).",
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
    p.add_argument("--image-timeout", type=float, default=None, metavar="SECONDS",
                   help="time limit per image read; a slower read is killed and its pair skipped "
                        "(default 60 with reader processes; 0: no limit)")
    p.add_argument("--decode-workers", type=int, default=2,
                   help="image reader processes per process of the run (0: read in this process, no time limit)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="skip pairs with an image of more pixels (default: Pillow's decompression-bomb limit)")
    _verbosity(p)
    return p


def preprocess_main(argv: list[str] | None = None) -> int:
    from dinalrm_align.errors import run_cli

    args = preprocess_parser().parse_args(argv)
    _setup(args)

    def body() -> int:
        from dinalrm_align.rm_training.preprocess import (
            SD3_BUCKETS,
            PreprocessOptions,
            format_summary,
            parse_buckets,
            preprocess,
            scale_buckets,
        )

        buckets = parse_buckets(args.buckets) if args.buckets else list(SD3_BUCKETS)
        if args.bucket_scale != 1.0:
            buckets = scale_buckets(buckets, args.bucket_scale, args.bucket_multiple)
        options = PreprocessOptions(
            source=args.source, output=args.out, layout=args.layout, vae=args.vae, image_root=args.image_root,
            buckets=buckets, min_size=args.min_size, shard_size=args.shard_size, batch_size=args.batch_size,
            seed=args.seed, dtype=args.dtype, progress=not args.quiet,
            image_timeout=(60.0 if args.decode_workers > 0 else None) if args.image_timeout is None else args.image_timeout,
            decode_workers=args.decode_workers, max_pixels=args.max_pixels,
        )
        summary = preprocess(options)
        print(format_summary(summary))
        return 0

    return run_cli("preprocess", body, verbose=args.verbose)
