"""`dinalrm-align score`: score image files for a prompt, one JSON line per image."""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dinalrm-align score",
        description="Score images with a latent reward model (VAE-encode, re-noise at sigma~u, score).",
    )
    p.add_argument("images", nargs="+", help="image files (PNG/JPEG/...)")
    p.add_argument("--model", required=True, help="reward model: hub id or local folder")
    p.add_argument(
        "--pipeline",
        default="stabilityai/stable-diffusion-3.5-medium",
        help="SD3 pipeline: hub id or local folder",
    )
    p.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="one prompt for all images, or one per image (repeat)",
    )
    p.add_argument(
        "--u",
        type=float,
        default=0.1,
        help="noise level sigma (0.1 for real images, 0.4 for generated latents)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the re-noising (scores are deterministic given it)"
    )
    p.add_argument("--n-noise", type=int, default=1, help="average over this many noise draws")
    p.add_argument("--max-sequence-length", type=int, default=128, help="T5 length (128 = training)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: cuda if available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from dinalrm_align.reward_model.model import LatentRewardModel
    from dinalrm_align.reward_model.pipeline_loading import load_sd3_pipeline

    prompts = args.prompt
    if len(prompts) not in (1, len(args.images)):
        print(
            f"error: give one --prompt or one per image ({len(args.images)}), got {len(prompts)}",
            file=sys.stderr,
        )
        return 2
    if not 0.0 <= args.u <= 1.0:
        print(f"error: --u must lie in [0, 1], got {args.u}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    try:
        pipe = load_sd3_pipeline(args.pipeline, torch_dtype=dtype, device=device)
        rm = LatentRewardModel.from_pretrained(
            args.model, transformer=pipe.transformer, torch_dtype=dtype, device=device
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    try:
        raw = rm.score_images(
            args.images,
            prompts if len(prompts) > 1 else prompts[0],
            pipe,
            u=args.u,
            generator=generator,
            max_sequence_length=args.max_sequence_length,
            n_noise=args.n_noise,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sigma = float(rm.sigma_for(args.u)[0][0])
    norm = rm.normalize(raw)
    for i, path in enumerate(args.images):
        record = {
            "image": path,
            "prompt": prompts[i] if len(prompts) > 1 else prompts[0],
            "raw": round(float(raw[i]), 6),
            "score": round(float(norm[i]), 6),
            "u": args.u,
            "sigma": round(sigma, 6),
            "seed": args.seed,
        }
        print(json.dumps(record))
    return 0
