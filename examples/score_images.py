"""Score image files with DiNa-LRM through the pixel bridge (VAE encode -> latent reward).

    python examples/score_images.py --tiny                    # tiny SD3.5-style models, two demo images
    python examples/score_images.py --tiny --backbone zimage  # tiny Z-Image-style (also: flux)
    python examples/score_images.py --model liuhuohuo/DiNa-LRM-SD35M-12layers \
        --pipeline stabilityai/stable-diffusion-3.5-medium --prompt "a cat on a sofa" cat1.png cat2.png

The images are encoded with the VAE of the reward model's family (SD3.5, FLUX.1 or Z-Image).
All images of one call must have the same size (they are centre-cropped to the latent grid);
for mixed sizes use ``rm.score_images`` or ``dinalrm-align score``. u = 0.1 is the
recommended noise level for clean (real or decoded) images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def _demo_images(folder: Path) -> list[str]:
    """Two 64x64 PNGs: a red square on white and random noise."""
    from PIL import Image

    square = np.full((64, 64, 3), 255, np.uint8)
    square[16:48, 16:48] = (220, 30, 30)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    paths = []
    for name, array in (("red_square.png", square), ("noise.png", noise)):
        Image.fromarray(array).save(folder / name)
        paths.append(str(folder / name))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="*", help="image files (same size)")
    p.add_argument("--tiny", action="store_true", help="built-in tiny models and two generated images")
    p.add_argument("--backbone", default="sd3", choices=["sd3", "flux", "zimage"], help="model family")
    p.add_argument("--model", default=None,
                   help="reward model (default: liuhuohuo/DiNa-LRM-SD35M-12layers for sd3; required otherwise)")
    p.add_argument("--pipeline", default=None, help="pipeline (default: the reward model's base pipeline)")
    p.add_argument("--prompt", default="a red cube", help="one prompt for all images")
    p.add_argument("--u", type=float, default=0.1)
    args = p.parse_args(argv)

    from dinalrm_align.rewards import DiNaLatentReward, PixelBridge

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

            pipe = tiny_pipeline(args.backbone, seed=0)
            reward = DiNaLatentReward(
                tiny_reward_model(args.backbone, pipe, seed=0), pipe, u=args.u, max_sequence_length=16
            )
            paths = args.images or _demo_images(Path(tmp))
        else:
            if not args.images:
                p.error("give image files (or --tiny)")
            model = args.model or ("liuhuohuo/DiNa-LRM-SD35M-12layers" if args.backbone == "sd3" else None)
            if model is None:
                p.error(f"--model is required for --backbone {args.backbone}")
            from dinalrm_align.reward_model.cli_score import default_pipeline

            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            reward = DiNaLatentReward.from_pretrained(
                model, args.pipeline or default_pipeline(model), torch_dtype=dtype, device=device, u=args.u
            )
            pipe = reward.pipeline
            paths = args.images
        bridge = PixelBridge(reward, pipe)  # images -> the family's VAE latents (posterior mean) -> reward
        scores = bridge(paths, prompts=[args.prompt] * len(paths))
        for path, score in zip(paths, scores.tolist()):
            print(json.dumps({"image": Path(path).name, "prompt": args.prompt, "score": round(score, 6),
                              "backbone": reward.model.adapter.name}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
