"""``python -m dinalrm_align.train RECIPE.yaml [--set k=v ...]``; works under ``accelerate launch -m``."""

from __future__ import annotations

import sys

from dinalrm_align.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
