"""Statistics, tables and plots of the alignment experiment (pure: reads the runs' measured numbers)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinalrm_align.demo.plots import save_figure

__all__ = ["aggregate", "compute_table", "draw_pictures", "markdown_report", "plot_curves", "t_interval"]

# two-sided 95 % Student-t quantiles t_{0.975, dof} for dof 1..30 (beyond: 1.96 is within 2 %)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half-width)`` of the 95 % t-interval of the mean over ``values`` (half-width nan for n < 2)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size < 2:
        return float(x.mean()), float("nan")
    t = _T975[min(x.size - 1, len(_T975)) - 1] if x.size - 1 <= len(_T975) else 1.96
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(x.size))


def aggregate(runs: list[dict[str, Any]], ceiling: float) -> dict[str, Any]:
    """Per-configuration statistics over seeds (all runs share one configuration name)."""
    gains = [r["golden_after"] - r["golden_before"] for r in runs]
    gap = [ceiling - r["golden_before"] for r in runs]
    frac = [g / d if d > 0 else float("nan") for g, d in zip(gains, gap)]
    out: dict[str, Any] = {"n": len(runs)}
    for key, values in {
        "golden_before": [r["golden_before"] for r in runs], "golden_after": [r["golden_after"] for r in runs],
        "golden_gain": gains, "fraction_of_gap": frac, "learned_before": [r["learned_before"] for r in runs],
        "learned_after": [r["learned_after"] for r in runs],
        "spearman": [r["spearman_golden_learned"] for r in runs], "steps": [float(r["steps"]) for r in runs],
        "run_cpu_s": [r["run_cpu_s"] for r in runs], "update_wall_s": [r["update_wall_s"] for r in runs],
    }.items():
        mean, half = t_interval(values)
        out[key] = {"mean": mean, "ci95": half, "values": values}
    out["stopped_early"] = sum(1 for r in runs if r.get("stopped_early"))
    flops = [r["flops_per_update"] for r in runs if r.get("flops_per_update")]
    if flops:
        per_update = float(np.mean(flops))
        tflops = [per_update * r["steps"] / 1e12 for r in runs]
        out["flops_per_update"] = per_update
        out["train_tflops"] = t_interval(tflops)[0]
        out["gain_per_tflop"] = t_interval([g / t for g, t in zip(gains, tflops)])
        out["gain_per_update_second"] = t_interval([g / r["update_wall_s"] for g, r in zip(gains, runs)])
    return out


def _fmt(stat: dict[str, Any], digits: int = 3) -> str:
    mean, half = stat["mean"], stat["ci95"]
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if not math.isfinite(half) else f" ± {half:.{digits}f}")


def compute_table(results: dict[str, dict[str, Any]], rows: Sequence[str]) -> str:
    """Markdown: golden before / after / gain (95 % t-interval over seeds), share of the gap to the ceiling
    closed, learned reward before -> after, Spearman(golden, learned) over the evaluations, steps."""
    lines = ["| configuration | seeds | golden before | golden after | golden gain | share of gap to ceiling | "
             "learned before -> after | Spearman | steps (early stops) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in rows:
        if name not in results:
            continue
        a = results[name]
        lines.append(
            f"| {name} | {a['n']} | {_fmt(a['golden_before'])} | {_fmt(a['golden_after'])} | {_fmt(a['golden_gain'])} | "
            f"{_fmt(a['fraction_of_gap'], 2)} | {a['learned_before']['mean']:.1f} -> {a['learned_after']['mean']:.1f} | "
            f"{_fmt(a['spearman'], 2)} | {a['steps']['mean']:.0f} ({a['stopped_early']}) |")
    return "\n".join(lines)


def compute_cost_table(results: dict[str, dict[str, Any]], rows: Sequence[str]) -> str:
    """Markdown: FLOPs per update, training TFLOPs, golden gain per TFLOP and per update-second."""
    lines = ["| reward | FLOPs / update (GFLOP) | batch | training TFLOP | golden gain | gain / TFLOP | "
             "update wall s | gain / update-second |", "|---|---|---|---|---|---|---|---|"]
    for name in rows:
        a = results.get(name)
        if not a or "flops_per_update" not in a:
            continue
        gpt, gps = a["gain_per_tflop"], a["gain_per_update_second"]
        lines.append(
            f"| {name} | {a['flops_per_update'] / 1e9:.2f} | {a.get('batch_size', '')} | {a['train_tflops']:.3f} | "
            f"{_fmt(a['golden_gain'])} | {gpt[0]:.3f} ± {gpt[1]:.3f} | {a['update_wall_s']['mean']:.1f} | "
            f"{gps[0]:.5f} ± {gps[1]:.5f} |")
    return "\n".join(lines)


def markdown_report(data: dict[str, Any]) -> str:
    """The whole report (setup, main table, ablation, latent vs pixel, controls) as markdown."""
    s = data["setup"]
    res = data["results"]
    acc = s["latent_rm"]["accuracy"]
    lines = [
        f"# Alignment in the colour world: tiny {data.get('backbone', 'sd3')} policy ({data['date']}, {data['machine']})",
        "",
        f"Command: `{data['command']}`; measured total {data['total_wall_s'] / 60:.1f} min wall, "
        f"{data['total_cpu_s'] / 60:.1f} min CPU (this process).",
        "",
        f"Held-out prompts: {len(s['eval_prompts'])}; golden ceiling (best tint within [-3, 3]^3 of the base sample) "
        f"{s['ceiling']:.3f}; pairs: {s['pairs']['train']['pairs']} train / {s['pairs']['eval']['pairs']} held-out.",
        f"Latent RM: held-out accuracy u=0.4 {100 * acc.get('0.4', float('nan')):.1f} %"
        + (f", ensemble {100 * acc['ensemble']:.1f} %" if "ensemble" in acc else "")
        + f"; {s['latent_rm']['params_total']:,} parameters ({s['latent_rm']['params_trainable']:,} trainable)."
        + (f" More-pairs RM: u=0.4 {100 * s['latent_rm_more']['accuracy'].get('0.4', float('nan')):.1f} %."
           if "latent_rm_more" in s else "")
        + (f" Pixel RM: held-out accuracy {100 * s['pixel_rm']['accuracy']:.1f} %, {int(s['pixel_rm']['params']):,} "
           "parameters." if "pixel_rm" in s else ""),
        "",
    ]
    sections = [
        ("ReFL ablation (one change at a time, then combined) and GRPO", compute_table,
         data["ablation_rows"] + data["other_rows"]),
        ("Latent vs pixel reward at equal FLOPs per update (ReFL)", compute_cost_table, data["cost_rows"]),
        ("Controls", compute_table, data["control_rows"]),
    ]
    for title, table, rows in sections:
        if title.startswith("Latent") and not any("pixel" in r for r in rows):
            continue
        if rows:
            lines += [f"## {title}", "", table(res, rows), ""]
    return "\n".join(lines) + "\n"


def plot_curves(path: str | Path, runs: dict[str, list[dict[str, Any]]], names: Sequence[str], title: str) -> Path:
    """Golden (left) and learned (right) reward of the held-out prompts over training, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axl) = plt.subplots(1, 2, figsize=(12.5, 4.6), dpi=110, gridspec_kw={"wspace": 0.3})
    for i, name in enumerate(names):
        group = runs.get(name) or []
        if not group:
            continue
        n = min(len(r["golden_curve"]) for r in group)
        steps = group[0]["eval_steps"][:n]
        ax.plot(steps, np.mean([r["golden_curve"][:n] for r in group], axis=0), "o-", color=f"C{i}", label=name, ms=3)
        axl.plot(steps, np.mean([r["learned_curve"][:n] for r in group], axis=0), "o-", color=f"C{i}", label=name, ms=3)
    ax.set_xlabel("training step (optimizer updates)")
    ax.set_ylabel("golden reward (held-out prompts, mean over seeds)")
    axl.set_xlabel("training step (optimizer updates)")
    axl.set_ylabel("optimised reward, raw (held-out prompts, mean over seeds)")
    for a in (ax, axl):
        a.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, bbox_to_anchor=(0.5, -0.02 - 0.035 * len(labels) / 2))
    return save_figure(fig, path, title)


def draw_pictures(data: dict[str, Any], json_path: Path) -> dict[str, str]:
    """``<json stem>_curves.png`` (ablation and GRPO) and ``<json stem>_controls.png`` (latent vs pixel, controls)."""
    runs = data["runs"]
    main = data["ablation_rows"] + data["other_rows"]
    side = data["cost_rows"] + [r for r in data["control_rows"] if r not in data["cost_rows"]]
    has_pixel = any("pixel" in r for r in data["cost_rows"])
    return {
        "main": str(plot_curves(json_path.with_name(f"{json_path.stem}_curves.png"), runs, main,
                                "ReFL ablation and GRPO" if data["other_rows"] else "ReFL")),
        "controls": str(plot_curves(json_path.with_name(f"{json_path.stem}_controls.png"), runs, side,
                                    ("latent vs pixel reward, and " if has_pixel else "") + "controls")),
    }
