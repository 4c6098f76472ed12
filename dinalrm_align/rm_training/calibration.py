"""Calibration ("logistic normalisation") of preference probabilities on held-out pairs (pure math).

Raw reward differences ``d = r_chosen - r_rejected`` become probabilities two ways:

- ``temperature``: ``P = sigmoid(d / T)``; ``T`` minimises the NLL (1-D, convex in ``1/T``).
- ``logistic``: the bounded output of the reference design, ``g(r) = 4 sigmoid((r - eta3) / |eta4|) - 2``
  in (-2, 2), and ``P = sigmoid(g(r_chosen) - g(r_rejected))``; ``eta3, eta4`` minimise the NLL.

Targets are the observed preference ``y`` in [0, 1] (vote share, or 1 when only the winner is known).
Every pair enters both ways round -- ``(d, y)`` and ``(-d, 1 - y)`` -- so that the reliability diagram
and the ECE cover the whole [0, 1] range and do not depend on which image is listed first.
The uncalibrated baseline is ``T = 1``, i.e. what ``rm.preference_probability`` returns without calibration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from dinalrm_align.reward_model.model import LatentRewardModel

Method = Literal["temperature", "logistic"]
METHODS: tuple[str, ...] = ("temperature", "logistic")
_CLIP = 1e-7


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def symmetrize(diff: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d, y)`` -> ``(concat(d, -d), concat(y, 1 - y))``."""
    d = np.asarray(diff, dtype=np.float64).reshape(-1)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    if d.shape != y.shape or d.size == 0:
        raise ValueError(f"need non-empty diffs and targets of the same length, got {d.shape} and {y.shape}")
    if np.any((y < 0) | (y > 1)) or not np.all(np.isfinite(d)):
        raise ValueError("targets must lie in [0, 1] and score differences must be finite")
    return np.concatenate([d, -d]), np.concatenate([y, 1.0 - y])


def symmetrize_probabilities(prob: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(p, y)`` -> ``(concat(p, 1 - p), concat(y, 1 - y))``: both orders of every pair."""
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"need non-empty probabilities and targets of the same length, got {p.shape} and {y.shape}")
    return np.concatenate([p, 1.0 - p]), np.concatenate([y, 1.0 - y])


def negative_log_likelihood(prob: np.ndarray, target: np.ndarray) -> float:
    """Mean Bernoulli NLL ``-(y log p + (1 - y) log(1 - p))`` (natural log, per comparison)."""
    p = np.clip(np.asarray(prob, dtype=np.float64), _CLIP, 1 - _CLIP)
    y = np.asarray(target, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def reliability_bins(prob: np.ndarray, target: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins over [0, 1]: ``lo``, ``hi``, ``count``, ``mean_predicted``, ``mean_observed``."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    which = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        bins.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": count,
                "mean_predicted": float(p[mask].mean()) if count else float("nan"),
                "mean_observed": float(y[mask].mean()) if count else float("nan"),
            }
        )
    return bins


def expected_calibration_error(prob: np.ndarray, target: np.ndarray, n_bins: int = 10) -> float:
    """ECE = sum over bins of ``count / N * |mean_predicted - mean_observed|``."""
    bins = reliability_bins(prob, target, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        raise ValueError("no predictions to calibrate")
    return float(sum(b["count"] / n * abs(b["mean_predicted"] - b["mean_observed"]) for b in bins if b["count"]))


def fit_temperature(
    diff: np.ndarray, target: np.ndarray, bounds: tuple[float, float] = (1e-3, 1e3), iters: int = 200
) -> float:
    """Temperature ``T`` minimising the NLL of ``sigmoid(d / T)`` (golden-section search on ``log T``).

    The NLL is convex in ``1/T``, hence unimodal in ``log T``. Perfectly separated data drive ``T``
    to the lower bound.
    """
    d, y = symmetrize(diff, target)
    lo, hi = math.log(bounds[0]), math.log(bounds[1])

    def loss(log_t: float) -> float:
        return negative_log_likelihood(_sigmoid(d / math.exp(log_t)), y)

    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, e = b - ratio * (b - a), a + ratio * (b - a)
    fc, fe = loss(c), loss(e)
    for _ in range(iters):
        if fc < fe:
            b, e, fe = e, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, e, fe
            e = a + ratio * (b - a)
            fe = loss(e)
        if b - a < 1e-9:
            break
    return float(math.exp((a + b) / 2))


def logistic_output(raw: np.ndarray | torch.Tensor, eta3: float, eta4: float) -> Any:
    """The bounded output ``4 sigmoid((raw - eta3) / (|eta4| + 1e-6)) - 2`` (numpy or torch)."""
    if isinstance(raw, torch.Tensor):
        return 4.0 * torch.sigmoid((raw - eta3) / (abs(eta4) + 1e-6)) - 2.0
    return 4.0 * _sigmoid((np.asarray(raw, dtype=np.float64) - eta3) / (abs(eta4) + 1e-6)) - 2.0


def fit_logistic(
    raw_chosen: np.ndarray, raw_rejected: np.ndarray, target: np.ndarray, steps: int = 300
) -> tuple[float, float]:
    """``(eta3, eta4)`` minimising the NLL of ``sigmoid(g(r_chosen) - g(r_rejected))`` (Adam on float64).

    Initialised at the raw scores' median and standard deviation.
    """
    a = torch.as_tensor(np.asarray(raw_chosen, dtype=np.float64))
    b = torch.as_tensor(np.asarray(raw_rejected, dtype=np.float64))
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError("raw_chosen and raw_rejected must be non-empty and of the same length")
    y = torch.as_tensor(np.asarray(target, dtype=np.float64))
    both = torch.cat([a, b])
    eta3 = torch.tensor(float(both.median()), dtype=torch.float64, requires_grad=True)
    eta4 = torch.tensor(max(float(both.std()), 1e-3), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([eta3, eta4], lr=0.05 * max(float(both.std()), 1e-3))
    for _ in range(steps):
        scale = eta4.abs() + 1e-6
        logits = 4.0 * (torch.sigmoid((a - eta3) / scale) - torch.sigmoid((b - eta3) / scale))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(eta3.detach()), float(eta4.detach().abs())


@dataclass
class CalibrationMetrics:
    """NLL / log-likelihood (per comparison, symmetrised), ECE and the reliability bins."""

    nll: float
    log_likelihood: float
    ece: float
    bins: list[dict[str, float]] = field(default_factory=list)


def metrics(prob: np.ndarray, target: np.ndarray, n_bins: int = 10) -> CalibrationMetrics:
    """Metrics of symmetrised probabilities ``prob`` against targets."""
    nll = negative_log_likelihood(prob, target)
    return CalibrationMetrics(nll, -nll, expected_calibration_error(prob, target, n_bins), reliability_bins(prob, target, n_bins))


def pair_probabilities(
    raw_chosen: np.ndarray, raw_rejected: np.ndarray, temperature: float = 1.0, logistic: dict[str, float] | None = None
) -> np.ndarray:
    """``P(chosen preferred)`` (N,) under a calibration (default: uncalibrated ``sigmoid(d)``)."""
    a = np.asarray(raw_chosen, dtype=np.float64)
    b = np.asarray(raw_rejected, dtype=np.float64)
    if logistic:
        a, b = logistic_output(a, logistic["eta3"], logistic["eta4"]), logistic_output(b, logistic["eta3"], logistic["eta4"])
    return _sigmoid((a - b) / temperature)


@dataclass
class CalibrationResult:
    """Fitted parameters and before/after metrics (on the evaluation pairs)."""

    method: str
    temperature: float | None
    logistic: dict[str, float] | None
    num_fit_pairs: int
    num_eval_pairs: int
    before: CalibrationMetrics
    after: CalibrationMetrics

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(
    fit_chosen: np.ndarray,
    fit_rejected: np.ndarray,
    fit_target: np.ndarray,
    eval_chosen: np.ndarray | None = None,
    eval_rejected: np.ndarray | None = None,
    eval_target: np.ndarray | None = None,
    method: str = "temperature",
    n_bins: int = 10,
) -> CalibrationResult:
    """Fit on the ``fit_*`` pairs; report metrics before (``T = 1``) and after on the ``eval_*`` pairs
    (the fit pairs themselves when no eval pairs are given)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid methods: {', '.join(METHODS)}")
    if eval_chosen is None:
        eval_chosen, eval_rejected, eval_target = fit_chosen, fit_rejected, fit_target
    fit_d = np.asarray(fit_chosen, dtype=np.float64) - np.asarray(fit_rejected, dtype=np.float64)
    temperature: float | None = None
    logistic: dict[str, float] | None = None
    if method == "temperature":
        temperature = fit_temperature(fit_d, fit_target)
    else:
        eta3, eta4 = fit_logistic(fit_chosen, fit_rejected, fit_target)
        logistic = {"eta3": eta3, "eta4": eta4}
    before_p = pair_probabilities(eval_chosen, eval_rejected)
    after_p = pair_probabilities(eval_chosen, eval_rejected, temperature or 1.0, logistic)
    y = np.asarray(eval_target, dtype=np.float64)
    return CalibrationResult(
        method,
        temperature,
        logistic,
        int(fit_d.size),
        int(before_p.size),
        metrics(*symmetrize_probabilities(before_p, y), n_bins),
        metrics(*symmetrize_probabilities(after_p, y), n_bins),
    )


def apply_to_model(rm: LatentRewardModel, result: CalibrationResult) -> None:
    """Store the fitted parameters in ``rm.config`` (persisted by ``save_pretrained``).

    ``temperature`` -> ``config.normalization.temperature`` (used by ``rm.preference_probability``);
    ``logistic`` -> ``config.logistic = {"eta3", "eta4"}``.
    """
    if result.temperature is not None:
        rm.config.normalization.temperature = float(result.temperature)
    if result.logistic is not None:
        rm.config.logistic = {k: float(v) for k, v in result.logistic.items()}
