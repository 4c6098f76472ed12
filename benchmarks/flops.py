"""Real-scale FLOPs of the latent reward vs pixel-space rewards, counted on the meta device.

The published architectures are built from their configs under ``torch.device("meta")`` (no
weights, no memory, no GPU) and every call is counted with ``FlopCounterMode`` (2 FLOPs per
multiply-add; matmuls, convolutions and attention). Batch 1, square images.

Counted, per resolution and text length:

* DiNa-LRM (the project's ``LatentRewardModel``): forward, and forward + backward to the latents (what
  ReFL pays); the architecture minimum (kept blocks + embedders + reward LoRA + head) from an independent
  re-implementation (LoRA unmerged and merged) and a closed-form count;
* pixel-space rewards: VAE decode (fwd, fwd+bwd) + CLIP ViT-H/14 (PickScore/HPSv2 class), and
  + Qwen2-VL-7B (HPSv3 class) with its image tokens at that resolution;
* the ReFL update per graded sample: no-grad rollout (with or without CFG), graded policy step (fwd + bwd
  into the policy LoRA), reward (fwd + bwd), with several graded steps sharing one rollout.

Backbones: SD3.5-Medium (``benchmarks.flops_sd3``: the released reward model, the paper's recipe and the
comparison with its figure) and FLUX.1-dev / Z-Image-Turbo (``benchmarks.flops_families``: their upstream
reward configs, FLUX AE decode, no-CFG rollouts of 28 / 8 steps). The report is ``benchmarks.flops_report``.

Usage::

    python -m benchmarks.flops                                  # full scale, ~2-3 min on 2 cores
    python -m benchmarks.flops --update-doc docs/benchmarks.md  # also refresh the doc's sections
    python -m benchmarks.flops --preset tiny --resolutions 64 --t5-lengths 16 --family-text-length 16   # tests
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/x.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from benchmarks.families import FAMILIES  # noqa: E402
from benchmarks.flops_families import family_part  # noqa: E402
from benchmarks.flops_report import markdown, markdown_sections  # noqa: E402
from benchmarks.flops_rows import (  # noqa: E402, F401  (re-exported: the benchmark's public names)
    K_HIGH,
    K_LOW,
    LatentRewardCounter,
    Scenario,
    backbone_rows,
    refl_breakdown,
)
from benchmarks.flops_sd3 import (  # noqa: E402, F401
    PAPER,
    SCENARIOS,
    VLM_CAPPED_RESOLUTION,
    MetaModels,
    paper_comparison,
    sd3_part,
)

DEFAULT_JSON = C.REPO_ROOT / "benchmarks" / "results" / "flops.json"
#: Text length of the FLUX.1 / Z-Image rows (both families' reward models are trained at 128 tokens).
FAMILY_TEXT_LENGTH = 128


def run(
    preset_name: str = "full",
    resolutions: Sequence[int] = (512, 1024),
    t5_lengths: Sequence[int] = (128, 256),
    vlm_cap: int | None = VLM_CAPPED_RESOLUTION,
    families: Sequence[str] = FAMILIES,
    family_text_length: int = FAMILY_TEXT_LENGTH,
) -> dict[str, Any]:
    """Count everything; returns a JSON-serialisable dict (SD3.5 at the top level, the other families under
    ``"families"``)."""
    import diffusers
    import transformers

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    t0 = time.perf_counter()
    preset = C.get_preset(preset_name)
    sd3 = sd3_part(preset, resolutions, t5_lengths, vlm_cap)
    result: dict[str, Any] = {
        "preset": preset_name,
        "description": preset.description,
        "units": "FLOPs (2 per multiply-accumulate), batch 1",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "date": datetime.date.today().isoformat(),
        "parameters": sd3["parameters"],
        "configs": sd3["configs"],
        "meta_device": sd3["meta_device"],
    }
    result["paper_comparison"] = paper_comparison(result)
    result["families"] = {}
    for name in families:
        result["families"][name] = family_part(name, preset_name, resolutions, [family_text_length],
                                               pixel=sd3["pixel"], scorers=sd3["scorers"])
    result["wall_s"] = time.perf_counter() - t0
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full", choices=["full", "small", "tiny"])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--t5-lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--vlm-cap", type=int, default=VLM_CAPPED_RESOLUTION,
                        help="also count the VLM on images downscaled to this side (0: skip)")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES),
                        help="other policy families to count besides SD3.5 (none: SD3.5 only; presets full/tiny)")
    parser.add_argument("--family-text-length", type=int, default=FAMILY_TEXT_LENGTH,
                        help="text tokens of the FLUX.1 / Z-Image rows")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="replace the flops (and flops-families) sections of this doc")
    args = parser.parse_args(argv)
    if min(args.resolutions) <= 0 or min(args.t5_lengths) <= 0 or args.family_text_length <= 0:
        parser.error("--resolutions, --t5-lengths and --family-text-length must be positive")
    if args.families and args.preset == "small":
        parser.error("the FLUX.1 / Z-Image rows have presets full and tiny: pass --families (none) with --preset small")
    result = run(args.preset, args.resolutions, args.t5_lengths, vlm_cap=args.vlm_cap or None,
                 families=args.families, family_text_length=args.family_text_length)
    result["command"] = "python -m benchmarks.flops " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result)
    print(text)
    C.write_json(args.json, result)
    print(f"\nJSON: {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.update_doc:
        for name, section in markdown_sections(result).items():
            C.replace_doc_section(args.update_doc, name, section)
    return result


if __name__ == "__main__":
    main()
