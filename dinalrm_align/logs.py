"""Logging for every command: one format, ``--quiet`` / ``--verbose``, no known noise, tqdm-friendly.

Library modules log through ``logging.getLogger(__name__)`` (``accelerate.logging.get_logger`` in the
trainer, so that only the main process prints). :func:`setup_logging` installs one handler that writes
through ``tqdm.write`` (progress bars stay intact) and filters messages that are noise for this package's
users: diffusers' "should be kept in float32: []" on every dtype cast, "No LoRA keys associated to
CLIPTextModel ..." when loading a transformer-only LoRA, the ``torch_dtype`` deprecation, transformers'
slow-image-processor notices, and DeepSpeed's "Setting accelerator to CPU" line (avoided by telling
DeepSpeed the accelerator when no GPU is present).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

__all__ = ["NOISE_PATTERNS", "quiet_environment", "setup_logging"]

#: Messages that carry no information for users of this package (regular expressions).
NOISE_PATTERNS: tuple[str, ...] = (
    r"should be kept in float32: \[\]",
    r"No LoRA keys associated to (CLIPTextModel|CLIPTextModelWithProjection|T5EncoderModel|Qwen3)",
    r"`torch_dtype` is deprecated",
    r"torch_dtype.*is deprecated",
    r"slow image processor|use_fast|torchvision is not available|Using a slow",
    r"Setting accelerator to CPU",
    r"requires torchvision",
    r"You are using a model of type .* to instantiate",
)
_NOISE = re.compile("|".join(f"(?:{p})" for p in NOISE_PATTERNS))
_LOGGERS = ("diffusers", "transformers", "accelerate", "peft", "DeepSpeed", "deepspeed", "torch.distributed")


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not _NOISE.search(record.getMessage())
        except Exception:  # noqa: BLE001 - a malformed record is not our problem
            return True


class _TqdmHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so that progress bars are not broken by log lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def quiet_environment() -> None:
    """Environment settings that avoid known noise before the heavy libraries are imported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn at import
    except ImportError:  # pragma: no cover
        pass
    for pattern in NOISE_PATTERNS:
        warnings.filterwarnings("ignore", message=f".*(?:{pattern}).*")


def setup_logging(verbosity: int = 0) -> None:
    """Configure logging once per command.

    ``verbosity``: -1 quiet (warnings and errors only), 0 normal (info from this package, warnings from
    libraries), 1 verbose (debug from this package, info from libraries).
    """
    quiet_environment()
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}.get(max(-1, min(1, verbosity)), logging.INFO)
    lib_level = logging.INFO if verbosity > 0 else logging.WARNING if verbosity == 0 else logging.ERROR
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("[dinalrm-align] %(message)s" if verbosity <= 0
                                           else "%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_NoiseFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _TqdmHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lib_level)
    logging.getLogger("dinalrm_align").setLevel(level)
    for name in _LOGGERS:
        lib = logging.getLogger(name)
        lib.setLevel(lib_level)
        lib.addFilter(_NoiseFilter())
    try:  # libraries with their own verbosity switches
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        quiet_bars = verbosity < 0 or int(os.environ.get("RANK", "0") or 0) != 0  # bars on the main process only
        for mod in (dlog, tlog):
            mod.set_verbosity(lib_level)
            mod.disable_default_handler()
            mod.enable_propagation()
            if quiet_bars:
                mod.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
