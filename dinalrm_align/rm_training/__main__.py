"""``python -m dinalrm_align.rm_training RECIPE.yaml`` (also under ``accelerate launch -m``): train-rm."""

import sys

from dinalrm_align.rm_training.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
