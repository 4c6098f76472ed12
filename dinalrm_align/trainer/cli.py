"""``dinalrm-align train RECIPE.yaml [key.sub=value ...]`` (also ``python -m dinalrm_align.train`` and
``accelerate launch -m dinalrm_align.train``). The recipe's ``algorithm.name`` picks ReFL, GRPO or
reward-model training; ``dinalrm-align train-rm`` is the same command with ``reward_model`` as default.
"""

from __future__ import annotations

import argparse
import os
import sys

USAGE_EXAMPLES = """examples:
  dinalrm-align train recipes/tiny_refl.yaml
  dinalrm-align train recipes/refl_sd35m_1gpu.yaml train.max_steps=100 tracking.mode=offline
  dinalrm-align train recipes/refl_sd35m.yaml --resume latest
  accelerate launch --config_file recipes/accelerate/8gpu.yaml -m dinalrm_align.train recipes/refl_sd35m.yaml
"""


def build_parser(prog: str = "dinalrm-align train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train from a YAML recipe: alignment (ReFL, GRPO) or a latent reward model.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="YAML recipe (see docs/training.md)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides in OmegaConf dotlist syntax, e.g. train.max_steps=10")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="same as a positional override (repeatable)")
    parser.add_argument("--resume", metavar="latest|PATH", help="resume from the newest checkpoint or a checkpoint folder")
    parser.add_argument("--allow-recipe-change", action="store_true",
                        help="resume although the recipe or data differ from the checkpoint's")
    parser.add_argument("--run-dir", help="shorthand for run_dir=DIR")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--check", action="store_true", help="run the cheap preflight checks and exit")
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help="after training, upload run_dir/final (weights + model card) to this Hub repo")
    parser.add_argument("--hub-public", action="store_true", help="create the Hub repo public (default: private)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bar")
    group.add_argument("-v", "--verbose", action="store_true", help="debug output and tracebacks")
    return parser


def main(argv: list[str] | None = None, *, default_algorithm: str = "refl", prog: str = "dinalrm-align train") -> int:
    from dinalrm_align.errors import run_cli
    from dinalrm_align.logs import setup_logging

    # intermixed: overrides may follow options (`train recipe.yaml -q train.max_steps=10`)
    args = build_parser(prog).parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    setup_logging(-1 if args.quiet else 1 if args.verbose else 0)
    overrides = list(args.overrides) + list(args.set_overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.allow_recipe_change:
        overrides.append("checkpoint.allow_recipe_change=true")

    def body() -> int:
        from dinalrm_align.trainer.recipe import config_to_dict, load_recipe

        config = load_recipe(args.recipe, overrides, default_algorithm=default_algorithm)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
            return 0
        from dinalrm_align.trainer.loop import Trainer

        main_process = int(os.environ.get("RANK", "0")) == 0
        if args.push_to_hub:
            from dinalrm_align.trainer.model_card import check_push

            check_push(args.push_to_hub)  # offline / malformed id: fail now, not after hours of training
        trainer = Trainer(config, progress=not args.quiet)
        pre = trainer.preflight()
        if args.check:
            if main_process:
                print(f"ok: {pre.summary}; {pre.world_size} process(es), gradient accumulation {pre.accumulation}")
            return 0
        summary = trainer.train()
        if args.push_to_hub and main_process and summary.final_dir:
            from dinalrm_align.trainer.model_card import push_to_hub

            url = push_to_hub(summary.final_dir, args.push_to_hub, private=not args.hub_public)
            print(f"pushed {summary.final_dir} to {url}")
        return 0

    return run_cli(prog.split(" ", 1)[-1], body, verbose=args.verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
