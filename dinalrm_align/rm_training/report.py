"""``dinalrm-align eval-rm``: accuracy per noise level, calibration, JSON report and PNG plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinalrm_align.rm_training import calibration as calib
from dinalrm_align.rm_training.evaluate import (
    ENSEMBLE_KEY,
    EvalSettings,
    evaluate_ranked_sets,
    load_ranked_sets,
    plot_accuracy_vs_u,
    plot_reliability,
    score_pairs,
    settings_dict,
    write_json,
)


@dataclass
class EvalJob:
    """Everything ``eval-rm`` needs (the CLI flags)."""

    model: str
    out: Path
    pipeline: str = "stabilityai/stable-diffusion-3.5-medium"
    pairs: str | None = None
    ranked: str | None = None
    us: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    ensemble: tuple[float, ...] | None = (0.2, 0.5, 0.7)
    seed: int = 0
    n_noise: int = 1
    batch_size: int = 16
    max_pairs: int | None = None
    max_sequence_length: int = 128
    calibrate: str = "temperature"
    calibration_level: str = "0.4"
    save_calibrated: str | None = None
    device: str | None = None
    progress: bool = True


def load_models(pipeline: str, model: str, device: torch.device) -> tuple[Any, Any]:
    """``(pipe, rm)``: the pipeline (any supported family) and the reward model on its transformer, fp32, eval.

    ``model`` may be a tiny id (``tiny[-flux|-zimage][:SEED]``): a random tiny reward model of that family.
    """
    from dinalrm_align.reward_model.model import LatentRewardModel
    from dinalrm_align.trainer.config import ModelConfig
    from dinalrm_align.trainer.policy import load_pipeline

    pipe, _ = load_pipeline(ModelConfig(pretrained=pipeline), torch.float32)
    if not Path(model).exists() and model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"reward model folder not found: {model}")
    rm = LatentRewardModel.from_pretrained(
        model, transformer=pipe.transformer, scheduler_config=dict(pipe.scheduler.config), torch_dtype=torch.float32
    )
    pipe.to(device)
    return pipe, rm.to(device).eval()


def calibration_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded halves ``(fit, eval)`` of ``n`` pairs."""
    if n < 4:
        raise ValueError(f"calibration needs at least 4 pairs, got {n}")
    order = np.random.default_rng(seed + 17).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def run_evaluation(job: EvalJob) -> dict[str, Any]:
    """Score, calibrate, plot; writes ``report.json`` (+ PNGs) into ``job.out`` and returns the report."""
    from dinalrm_align.backbones.conditioning import TextConditioning
    from dinalrm_align.reward_model.text import PromptEmbeddingCache, encode_conditioning
    from dinalrm_align.rm_training.data import PairDataset

    device = torch.device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = EvalSettings(
        us=job.us, ensemble=job.ensemble, seed=job.seed, n_noise=job.n_noise, batch_size=job.batch_size
    )
    pipe, rm = load_models(job.pipeline, job.model, device)
    cache = PromptEmbeddingCache()

    def encode(prompts: list[str]) -> TextConditioning:
        return encode_conditioning(pipe, prompts, job.max_sequence_length, device=device, dtype=torch.float32,
                                   cache=cache)

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": job.model, "pipeline": job.pipeline, "settings": settings_dict(settings)}
    curves: dict[str, dict[str, float]] = {}
    summary: dict[str, Any] = {}
    if job.pairs:
        dataset = PairDataset.from_source(job.pairs)
        n = len(dataset) if job.max_pairs is None else min(job.max_pairs, len(dataset))
        scores = score_pairs(rm, dataset, encode, settings, positions=np.arange(n), progress=job.progress)
        acc = scores.accuracy()
        curves["pairs"] = acc
        report["pairs"] = {"source": job.pairs, "num_pairs": n, "accuracy": acc}
        summary["pair_accuracy"] = acc
        if job.calibrate != "none":
            level = job.calibration_level
            if level != ENSEMBLE_KEY:
                level = f"{float(level):g}"
            if level not in scores.chosen:
                raise ValueError(f"calibration level {level!r} was not scored; scored levels: {list(scores.chosen)}")
            fit, held = calibration_split(n, job.seed)
            target = scores.observed_preference()
            c, r = scores.chosen[level], scores.rejected[level]
            result = calib.calibrate(c[fit], r[fit], target[fit], c[held], r[held], target[held], method=job.calibrate)
            report["calibration"] = {"level": level, **result.to_dict()}
            summary["calibration"] = {
                "method": result.method,
                "temperature": result.temperature,
                "logistic": result.logistic,
                "ece_before": result.before.ece,
                "ece_after": result.after.ece,
                "log_likelihood_before": result.before.log_likelihood,
                "log_likelihood_after": result.after.log_likelihood,
            }
            report["plots"] = report.get("plots", {})
            report["plots"]["reliability"] = str(
                plot_reliability(
                    {"before (T=1)": result.before.bins, f"after ({result.method})": result.after.bins},
                    out / "reliability.png",
                    title=f"Reliability at u={level} ({result.num_eval_pairs} held-out pairs)",
                )
            )
            if job.save_calibrated:
                calib.apply_to_model(rm, result)
                rm.save_pretrained(job.save_calibrated)
                report["calibrated_model"] = job.save_calibrated
    if job.ranked:
        sets = load_ranked_sets(job.ranked, pipe, seed=job.seed)
        ranked = evaluate_ranked_sets(rm, sets, encode, settings)
        curves["ranked sets"] = {k: v["accuracy"] for k, v in ranked.items()}
        report["ranked"] = {"source": job.ranked, "num_sets": len(sets), "accuracy": ranked}
        summary["ranked_accuracy"] = curves["ranked sets"]
    report.setdefault("plots", {})["accuracy_vs_u"] = str(plot_accuracy_vs_u(curves, out / "accuracy_vs_u.png"))
    report["summary"] = summary
    report["report"] = str(write_json(report, out / "report.json"))
    return report
