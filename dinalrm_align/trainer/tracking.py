"""Experiment tracking through accelerate's trackers (wandb / tensorboard / none).

Besides the tracker, every logged scalar row is appended to ``run_dir/metrics.jsonl`` on the main
process (one JSON object per call, with ``step``), so runs can be inspected without a tracker.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinalrm_align.trainer.config import TrackingConfig, flatten_dict

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator
    from PIL import Image


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    """Scalars, images and the run config to the configured tracker (main process only).

    Args:
        accelerator: built with ``log_with`` matching ``config.log_with``.
        config: the ``tracking`` section.
        run_dir: the run folder (wandb writes into ``run_dir/wandb`` unless ``WANDB_DIR`` is set).
    """

    def __init__(self, accelerator: Accelerator, config: TrackingConfig, run_dir: str | os.PathLike) -> None:
        self.accelerator = accelerator
        self.config = config
        self.run_dir = Path(run_dir)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self._started = False

    @property
    def enabled(self) -> bool:
        return self.config.log_with != "none"

    def start(self, run_config: dict[str, Any]) -> None:
        """Start the tracker run and store the resolved config (nested dict) in it."""
        if self.enabled:
            init_kwargs: dict[str, Any] = {}
            if self.config.log_with == "wandb":
                wandb_kwargs: dict[str, Any] = {"tags": list(self.config.tags)}
                if self.config.run_name:
                    wandb_kwargs["name"] = self.config.run_name
                if self.config.mode:
                    wandb_kwargs["mode"] = self.config.mode
                if self.config.entity:
                    wandb_kwargs["entity"] = self.config.entity
                if not os.environ.get("WANDB_DIR"):
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    wandb_kwargs["dir"] = str(self.run_dir)
                init_kwargs["wandb"] = wandb_kwargs
                config_values: dict[str, Any] = run_config
            else:
                config_values = flatten_dict(run_config)
            project = self.config.project
            if self.config.log_with == "tensorboard" and self.config.run_name:
                project = self.config.run_name
            self.accelerator.init_trackers(project, config=config_values, init_kwargs=init_kwargs)
        self._started = True

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log scalar metrics at ``step`` (tracker + ``metrics.jsonl``)."""
        values = {k: _scalar(v) for k, v in metrics.items()}
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with self.metrics_file.open("a") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.enabled and self._started:
            self.accelerator.log(values, step=step)

    def log_image(self, key: str, image: Image.Image, step: int, caption: str | None = None) -> None:
        """Log one PIL image (e.g. an eval grid) at ``step``."""
        if not (self.enabled and self._started and self.accelerator.is_main_process):
            return
        if self.config.log_with == "wandb":
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.log({key: wandb.Image(image, caption=caption)}, step=step)
        elif self.config.log_with == "tensorboard":
            import numpy as np

            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image(key, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")
            writer.flush()

    def finish(self) -> None:
        if self.enabled and self._started:
            self.accelerator.end_training()
        self._started = False


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``run_dir/metrics.jsonl`` (empty list if absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
