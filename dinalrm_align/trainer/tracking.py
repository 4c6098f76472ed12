"""Experiment tracking through accelerate's trackers (wandb / tensorboard / none) plus ``metrics.jsonl``.

Every logged scalar row is appended to ``run_dir/metrics.jsonl`` on the main process (one JSON object
per call, with ``step``); on resume the file is cut back to the resumed step, so it never holds two rows
of one step. Evaluations are logged with their captioned image grid and, for wandb, a table of prompt /
image / rewards; tensorboard gets the grid and a markdown table.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinalrm_align.trainer.recipe import flatten_dict
from dinalrm_align.trainer.sections import TrackingConfig

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

__all__ = ["Tracker", "read_metrics", "truncate_metrics"]


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def truncate_metrics(path: Path, step: int) -> int:
    """Drop rows of ``path`` whose ``step`` is after ``step`` (atomic rewrite); returns the number dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row_step = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            dropped += 1  # a torn last line of a killed run
            continue
        if row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class Tracker:
    """Scalars, images, tables and the run config to the configured tracker (main process only).

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

    def start(self, run_config: dict[str, Any], resumed_step: int = 0) -> None:
        """Start the tracker run with the resolved config; cut ``metrics.jsonl`` back to ``resumed_step``."""
        if self.accelerator.is_main_process:
            truncate_metrics(self.metrics_file, resumed_step)
        if self.enabled:
            init_kwargs: dict[str, Any] = {}
            if self.config.log_with == "wandb":
                wandb_kwargs: dict[str, Any] = {"tags": list(self.config.tags)}
                for key in ("run_name", "mode", "entity"):
                    value = getattr(self.config, key)
                    if value:
                        wandb_kwargs["name" if key == "run_name" else key] = value
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

    def log_eval(self, key: str, grid: Any, table: list[dict[str, Any]], step: int, caption: str | None = None) -> None:
        """An evaluation's captioned grid (PIL image) and per-sample table (prompt, image, rewards)."""
        if not (self.enabled and self._started and self.accelerator.is_main_process):
            return
        if self.config.log_with == "wandb":
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            payload: dict[str, Any] = {}
            if grid is not None:
                payload[f"{key}/grid"] = wandb.Image(grid, caption=caption)
            if table:
                columns = list(table[0])
                rows = [[wandb.Image(r[c]) if c == "image" and r[c] is not None else r[c] for c in columns] for r in table]
                payload[f"{key}/samples"] = wandb.Table(columns=columns, data=rows)
            if payload:
                run.log(payload, step=step)
        elif self.config.log_with == "tensorboard":
            import numpy as np

            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            if grid is not None:
                writer.add_image(f"{key}/grid", np.asarray(grid.convert("RGB")), global_step=step, dataformats="HWC")
            if table:
                columns = [c for c in table[0] if c != "image"]
                lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                for r in table:
                    cells = [f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]).replace("|", "/") for c in columns]
                    lines.append("| " + " | ".join(cells) + " |")
                writer.add_text(f"{key}/samples", "\n".join(lines), global_step=step)
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
