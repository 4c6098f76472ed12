"""`dinalrm-align score`: score image files for a prompt, one JSON line per image.

    dinalrm-align score --model liuhuohuo/DiNa-LRM-SD35M-12layers --prompt "a cat" img1.png img2.png
    dinalrm-align score --model tiny-flux --prompt "a cat" img.png      # offline tiny models (tiny, tiny-zimage)

Errors a user can make (a missing image, a bad model id, an unreachable hub id) are one line on stderr
(``dinalrm-align score: error: ...``) with exit code 1; wrong arguments exit with 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    p.add_argument(
        "--model", required=True, help="reward model: hub id, local folder or tiny id (tiny, tiny-flux, tiny-zimage)"
    )
    p.add_argument(
        "--pipeline",
        default=None,
        help="pipeline of the reward model's family (SD3.5, FLUX.1 or Z-Image): hub id, local folder or tiny id "
        "(default: the reward model's own base pipeline)",
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
    p.add_argument("--max-sequence-length", type=int, default=128, help="text length (128 = training)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: cuda if available)")
    p.add_argument("--verbose", "-v", action="store_true", help="library output and tracebacks on errors")
    return p


def default_pipeline(model: str) -> str:
    """The base pipeline of a reward model: the same tiny id, or its config's ``backbone_model_id``.

    Raises ValueError for a bad tiny id, FileNotFoundError / OSError when the model cannot be found.
    """
    from dinalrm_align.reward_model.checkpoint import find_config, resolve_model_folder
    from dinalrm_align.reward_model.config import RewardModelConfig
    from dinalrm_align.tiny_pipelines import parse_tiny_id

    if parse_tiny_id(str(model)) is not None:
        return str(model)
    return RewardModelConfig.from_file(find_config(resolve_model_folder(model))).backbone_model_id


def main(argv: list[str] | None = None) -> int:
    from dinalrm_align.errors import run_cli
    from dinalrm_align.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(1 if args.verbose else -1)  # stdout carries the JSON lines only
    return run_cli("score", lambda: _score(args), verbose=args.verbose)


def _score(args: argparse.Namespace) -> int:
    prompts = args.prompt
    if len(prompts) not in (1, len(args.images)):
        raise ValueError(f"give one --prompt or one per image ({len(args.images)}), got {len(prompts)}")
    if not 0.0 <= args.u <= 1.0:
        raise ValueError(f"--u must lie in [0, 1], got {args.u}")
    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:  # before any model is loaded
        raise FileNotFoundError(f"image file not found: {missing[0]}")
    import torch

    from dinalrm_align.backbones.loading import load_any_pipeline
    from dinalrm_align.reward_model.model import LatentRewardModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    pipeline_spec = args.pipeline or default_pipeline(args.model)
    pipe, adapter = load_any_pipeline(pipeline_spec, torch_dtype=dtype, what="--pipeline")
    adapter.freeze_pipeline(pipe, dtype)
    pipe.to(device)
    rm = LatentRewardModel.from_pretrained(
        args.model, transformer=pipe.transformer, torch_dtype=dtype, device=device,
        scheduler_config=pipe.scheduler.config,
    )
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    raw = rm.score_images(  # OSError for unreadable image files: one line too
        args.images,
        prompts if len(prompts) > 1 else prompts[0],
        pipe,
        u=args.u,
        generator=generator,
        max_sequence_length=args.max_sequence_length,
        n_noise=args.n_noise,
    )
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
