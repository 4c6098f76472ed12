"""``dinalrm-align train RECIPE.yaml`` (also ``python -m dinalrm_align.train`` and ``accelerate launch -m``)."""

from __future__ import annotations

import argparse
import logging
import sys

USAGE_EXAMPLES = """examples:
  dinalrm-align train recipes/tiny_refl.yaml
  dinalrm-align train recipes/refl_sd35m_1gpu.yaml --set train.max_steps=100 --set tracking.mode=offline
  dinalrm-align train recipes/refl_sd35m.yaml --resume latest
  accelerate launch --config_file recipes/accelerate/8gpu.yaml -m dinalrm_align.train recipes/refl_sd35m.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinalrm-align train",
        description="Align SD3 with a latent reward model (ReFL, GRPO, ...) from a YAML recipe.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="YAML recipe (see docs/training.md)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.max_steps=10 (value parsed as YAML; repeatable)",
    )
    parser.add_argument("--resume", metavar="latest|PATH", help="resume from the newest checkpoint or a checkpoint folder")
    parser.add_argument("--run-dir", help="shorthand for --set run_dir=DIR")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--check", action="store_true", help="run the cheap preflight checks and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dinalrm_align.trainer.config import config_to_dict, load_train_config

    try:
        config = load_train_config(args.recipe, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
            return 0
        from dinalrm_align.trainer.loop import Trainer

        trainer = Trainer(config)
        pre = trainer.preflight()
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"dinalrm-align train: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(
            f"ok: {len(pre.train_prompts)} training prompts, {len(pre.eval_prompts)} eval prompts, "
            f"{pre.world_size} process(es), gradient accumulation {pre.accumulation}"
            + (f", resuming from {pre.resume_from}" if pre.resume_from else "")
        )
        return 0
    trainer.train()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
