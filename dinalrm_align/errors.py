"""User-facing errors and the one place that turns them into a one-line message and an exit code.

Every command runs through :func:`run_cli`: a mistake a user can make (a missing file, a bad recipe, a
corrupt checkpoint, a model the offline cache lacks) is printed as ``dinalrm-align <command>: error:
<message>`` on one line with exit code 2; a diverged training exits with 3. ``--verbose`` (or the
environment variable ``DINALRM_VERBOSE=1``) also prints the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

__all__ = ["EXIT_DIVERGED", "EXIT_USAGE", "TrainingDiverged", "run_cli"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite value (the message names the quantity and the step)."""

    def __init__(self, quantity: str, step: int) -> None:
        self.quantity = quantity
        self.step = step
        super().__init__(
            f"training diverged: non-finite {quantity} at step {step}; the last checkpoint written before it is "
            "kept (lower optim.lr, clip gradients with optim.max_grad_norm or set train.max_retries, then continue "
            "with --resume latest --allow-recipe-change)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and text.startswith("'"):
        text = f"missing key {text}"
    return (text.splitlines()[0] if text else type(exc).__name__)


def run_cli(prog: str, body: Callable[[], int | None], verbose: bool = False) -> int:
    """Run a command body; known user errors become one line on stderr and a non-zero exit code."""
    verbose = verbose or os.environ.get("DINALRM_VERBOSE", "") not in ("", "0", "false")
    try:
        return int(body() or 0)
    except TrainingDiverged as exc:
        if verbose:
            traceback.print_exc()
        print(f"dinalrm-align {prog}: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, FileNotFoundError, ImportError, OSError, KeyError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"dinalrm-align {prog}: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dinalrm-align {prog}: interrupted", file=sys.stderr)
        return 130
