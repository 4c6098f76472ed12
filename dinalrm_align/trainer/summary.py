"""The end-of-run summary of the trainer (printed, and written as ``run_dir/summary.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TrainSummary"]


@dataclass
class TrainSummary:
    """End-of-run summary (also ``run_dir/summary.json``)."""

    run_dir: str
    steps: int
    resumed_from_step: int
    time_s: float
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    headline: list[str] = field(default_factory=list)
    final_dir: str | None = None
    final_format: str = ""
    eval_grid: str | None = None
    stopped_early: str | None = None

    def format(self) -> str:
        lines = ["training finished" if not self.stopped_early else f"training stopped early: {self.stopped_early}"]
        lines.append(f"  steps            {self.steps}" + (f" (resumed from {self.resumed_from_step})"
                                                          if self.resumed_from_step else ""))
        lines.append(f"  time             {self.time_s:.1f} s")
        keys = self.headline or sorted(self.eval_after)
        for key in keys + sorted(set(self.eval_after) - set(keys)):
            if key not in self.eval_after or key.endswith("_std"):
                continue
            before = self.eval_before.get(key)
            label = key.split("/", 1)[-1]
            lines.append(f"  {label:<16} {'' if before is None else f'{before:.4f} -> '}{self.eval_after[key]:.4f}")
        lines.append(f"  saved            {self.final_dir} ({self.final_format})")
        if self.eval_grid:
            lines.append(f"  eval grid        {self.eval_grid}")
        return "\n".join(lines)
