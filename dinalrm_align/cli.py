"""`dinalrm-align` command line: a thin dispatcher.

Each command lives in its own module and is imported only when it runs, so that
`dinalrm-align --help` stays fast. A command entry is ``"module:function"``; the function takes
the remaining argument list and returns an exit code.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("dinalrm_align.reward_model.cli_score:main", "score images on disk with a latent reward model"),
    "train": ("dinalrm_align.trainer.cli:main", "align SD3.5 / FLUX.1 / Z-Image (ReFL, GRPO) or train a reward model from a recipe"),
    "train-rm": (
        "dinalrm_align.rm_training.cli:train_main",
        "train a latent reward model on preference pairs",
    ),
    "eval-rm": (
        "dinalrm_align.rm_training.cli:eval_main",
        "pairwise accuracy and calibration of a reward model",
    ),
    "preprocess": (
        "dinalrm_align.rm_training.cli:preprocess_main",
        "encode preference images into latent shards",
    ),
    "serve": ("dinalrm_align.serving.cli:main", "serve a latent reward model over HTTP"),
    "demo": ("dinalrm_align.demo.colour_world:main", "the colour-world demo on the tiny built-in models"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: dinalrm-align <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `dinalrm-align <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from dinalrm_align import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"dinalrm-align: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
