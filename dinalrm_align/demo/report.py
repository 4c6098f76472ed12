"""The colour world's report: ``report.json`` (every measured number), the PNGs and the printed summary."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dinalrm_align.demo.config import ColourWorldConfig

__all__ = ["build_report", "format_summary", "write_pictures"]

#: Target of the reward model's held-out pairwise accuracy at u = 0.4.
TARGET_ACCURACY = 0.85


def write_pictures(out: Path, align: Any, rm: Any, ba: dict[str, Any], optics: Any, title: str) -> dict[str, str]:
    """``curves.png`` (golden and learned reward over ReFL, RM accuracy per u) and ``before_after.png``."""
    from dinalrm_align.demo.plots import write_before_after_grid, write_curves

    curves = write_curves(out / "curves.png", align.eval_curve, rm.accuracy, align.train_curve, title=title)
    golden = {k: float(v.mean()) for k, v in ba["golden"].items()}
    grid = write_before_after_grid(out / "before_after.png", ba, optics, title=(
        f"{title}: held-out golden reward {golden['before']:.3f} -> {golden['after']:.3f}"))
    return {"curves": str(curves), "before_after": str(grid)}


def build_report(cfg: ColourWorldConfig, world: Any, pairs: dict[str, Any], rm: Any, align: Any,
                 ba: dict[str, Any], pictures: dict[str, str], timings: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Everything measured, as written to ``out/report.json``."""
    s = align.summary
    golden = {k: float(v.mean()) for k, v in ba["golden"].items()}
    learned = {k: float(v.mean()) for k, v in ba["learned"].items()}
    improved = float((ba["golden"]["after"] > ba["golden"]["before"]).float().mean())
    report = {
        "config": asdict(cfg),
        "world": {
            "backbone": cfg.backbone,
            "train_prompts": len(world.train_prompts),
            "eval_prompts": world.eval_prompts,
            "optics": str(world.optics_path),
            "decoder_colour_singular_values": world.optics.singular_values,
        },
        "pairs": {k: v["stats"] for k, v in pairs.items()},
        "reward_model": {
            "folder": rm.final_dir,
            "steps": rm.steps,
            "train_time_s": rm.train_time_s,
            "num_eval_pairs": rm.num_eval_pairs,
            "accuracy_per_u": rm.accuracy,
            "accuracy_vs_golden_order_per_u": rm.accuracy_vs_golden_order,
            "target_u0.4": TARGET_ACCURACY,
            "meets_target_u0.4": rm.accuracy.get("0.4", 0.0) >= TARGET_ACCURACY,
        },
        "alignment": {
            "lora": s.final_dir,
            "steps": s.steps,
            "train_time_s": align.train_time_s,
            "learned_reward_before_trainer_eval": s.eval_before.get("eval/reward_raw"),
            "learned_reward_after_trainer_eval": s.eval_after.get("eval/reward_raw"),
            "golden_before_trainer_eval": s.eval_before.get("eval/proxy/golden"),
            "golden_after_trainer_eval": s.eval_after.get("eval/proxy/golden"),
            "eval_curve": [{"step": a, "reward_raw": b, "golden": c} for a, b, c in align.eval_curve],
        },
        "held_out": {
            "prompts": ba["prompts"],
            "golden_before": golden["before"],
            "golden_after": golden["after"],
            "golden_gain": golden["after"] - golden["before"],
            "learned_before": learned["before"],
            "learned_after": learned["after"],
            "fraction_of_prompts_improved": improved,
            "golden_before_per_prompt": ba["golden"]["before"].tolist(),
            "golden_after_per_prompt": ba["golden"]["after"].tolist(),
            "learned_before_per_prompt": ba["learned"]["before"].tolist(),
            "learned_after_per_prompt": ba["learned"]["after"].tolist(),
        },
        "pictures": pictures,
        "timings": timings,
    }
    path = Path(cfg.out_dir) / "report.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    report["report"] = str(path)
    return report


def _duration(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)} min {rest:.0f} s" if minutes else f"{rest:.1f} s"


def format_summary(report: dict[str, Any]) -> str:
    """The printed summary: measured numbers, measured times per stage, where the outputs are."""
    rm, al, ho, t = report["reward_model"], report["alignment"], report["held_out"], report["timings"]
    acc = rm["accuracy_per_u"]
    lines = [
        "colour world finished",
        f"  pairs            train {report['pairs']['train']['pairs']}, held-out {report['pairs']['eval']['pairs']} "
        f"(annotator agrees with the golden order on {100 * report['pairs']['eval']['label_agreement_with_golden']:.1f} %)",
        "  reward model     held-out pairwise accuracy: " + ", ".join(
            f"{'ensemble' if k == 'ensemble' else f'u={k}'} {100 * v:.1f} %" for k, v in acc.items()),
        f"                   at u=0.4: {100 * acc.get('0.4', float('nan')):.1f} % (target >= "
        f"{100 * rm['target_u0.4']:.0f} %: {'met' if rm['meets_target_u0.4'] else 'NOT met'})",
        f"  ReFL             {al['steps']} steps; learned reward (held-out, raw) {ho['learned_before']:.2f} -> "
        f"{ho['learned_after']:.2f}",
        f"  golden reward    held-out prompts {ho['golden_before']:.4f} -> {ho['golden_after']:.4f} "
        f"({ho['golden_gain']:+.4f}; {100 * ho['fraction_of_prompts_improved']:.0f} % of prompts improved)",
        "  measured time    " + ", ".join(f"{name} {_duration(v['wall_s'])}" for name, v in t.items() if name != "total")
        + f"; total {_duration(t['total']['wall_s'])} wall, {_duration(t['total']['cpu_s'])} CPU",
        f"  curves           {report['pictures']['curves']}",
        f"  before/after     {report['pictures']['before_after']}",
        f"  report           {report['report']}",
        f"  reward model     {rm['folder']}",
        f"  policy LoRA      {al['lora']}",
    ]
    return "\n".join(lines)
