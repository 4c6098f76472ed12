"""Pairwise preference accuracy of a latent reward model (the paper's protocol), reports and plots.

Protocol (as the released evaluation): every image is noised at sigma ~= u with its own noise draw (seeded),
scored; a pair counts as correct when the score order agrees with the human order. Ties -- equal
scores OR equal human ranks -- count as wrong but stay in the denominator. Accuracy is reported per
u in {0.2, ..., 0.8} and for the multi-noise ensemble {0.2, 0.5, 0.7}; scores may be averaged over
several noise draws (``n_noise``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from dinalrm_align.backbones.conditioning import TextConditioning
    from dinalrm_align.rm_training.data import PairDataset

#: Noise levels of the accuracy-vs-noise protocol and the default ensemble.
DEFAULT_US: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_ENSEMBLE: tuple[float, ...] = (0.2, 0.5, 0.7)
ENSEMBLE_KEY = "ensemble"

#: ``encode(prompts) -> TextConditioning`` (the reward model's family's text stack).
EncodeFn = Callable[[list[str]], "TextConditioning"]


# ----------------------------------------------------------------------------------------------
# Accuracy rules (pure)
# ----------------------------------------------------------------------------------------------


def pair_accuracy(score_chosen: np.ndarray | torch.Tensor, score_rejected: np.ndarray | torch.Tensor) -> float:
    """Fraction of pairs with ``score_chosen > score_rejected`` (equal scores count as wrong)."""
    a = np.asarray(score_chosen, dtype=np.float64).reshape(-1)
    b = np.asarray(score_rejected, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty score arrays of the same length, got {a.shape} and {b.shape}")
    return float(np.mean(a > b))


def ranked_pair_counts(scores: Sequence[float] | np.ndarray, ranks: Sequence[float] | np.ndarray) -> tuple[int, int]:
    """``(correct, total)`` over all pairs ``i < j`` of one ranked set (rank 1 = best).

    Correct: human ranks differ, scores differ, and the better-ranked image has the higher score.
    Pairs with equal ranks or equal scores are wrong and counted in ``total``.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if s.shape != r.shape:
        raise ValueError(f"scores ({s.size}) and ranks ({r.size}) must have the same length")
    n = s.size
    if n < 2:
        return 0, 0
    i, j = np.triu_indices(n, k=1)
    human = np.sign(r[j] - r[i])  # +1: i better than j
    model = np.sign(s[i] - s[j])  # +1: i scored higher
    correct = (human != 0) & (model != 0) & (human == model)
    return int(correct.sum()), int(i.size)


def ranked_accuracy(score_sets: Sequence[Sequence[float]], rank_sets: Sequence[Sequence[float]]) -> float:
    """Pooled pairwise accuracy over several ranked sets (sum of correct / sum of pairs)."""
    correct = total = 0
    for s, r in zip(score_sets, rank_sets, strict=True):
        c, t = ranked_pair_counts(s, r)
        correct, total = correct + c, total + t
    if total == 0:
        raise ValueError("the ranked sets contain no pairs (each set needs at least two images)")
    return correct / total


# ----------------------------------------------------------------------------------------------
# Scoring with fixed seeds
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    """How scores are drawn: noise levels, ensemble, seed, noise draws, batch size."""

    us: tuple[float, ...] = DEFAULT_US
    ensemble: tuple[float, ...] | None = DEFAULT_ENSEMBLE
    seed: int = 0
    n_noise: int = 1
    batch_size: int = 32
    #: Give chosen and rejected of a pair the same noise draw (training uses it; the paper's
    #: evaluation draws one noise per image, the default).
    shared_noise: bool = False

    def __post_init__(self) -> None:
        self.us = tuple(float(u) for u in self.us)
        if self.ensemble is not None:
            self.ensemble = tuple(float(u) for u in self.ensemble)
        for u in self.us + (self.ensemble or ()):
            if not 0.0 <= u <= 1.0:
                raise ValueError(f"noise levels must lie in [0, 1], got {u}")
        if not self.us and not self.ensemble:
            raise ValueError("give at least one noise level or an ensemble")
        if self.n_noise < 1 or self.batch_size < 1:
            raise ValueError("n_noise and batch_size must be >= 1")

    def levels(self) -> list[str]:
        """Report keys: ``"0.2"``, ... and ``"ensemble"``."""
        return [level_key(u) for u in self.us] + ([ENSEMBLE_KEY] if self.ensemble else [])


def level_key(u: float) -> str:
    return f"{u:g}"


def _generator(seed: int, level: int, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + level * 10_007 + batch)


@torch.no_grad()
def score_latents(
    rm: Any,
    latents: torch.Tensor,
    cond: TextConditioning,
    level: str,
    settings: EvalSettings,
    generator: torch.Generator,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw scores (B,) of clean latents at one level (``"0.4"`` or ``"ensemble"``), averaged over
    ``settings.n_noise`` draws. ``noise`` (n_noise, B, C, h, w) overrides the generator."""
    device = rm.device
    b = latents.shape[0]
    if noise is None:
        noise = torch.randn((settings.n_noise, *latents.shape), generator=generator)
    latents, cond = latents.to(device), cond.to(device)
    total = torch.zeros(b, dtype=torch.float32, device=device)
    for k in range(settings.n_noise):
        eps = noise[k].to(device=device, dtype=latents.dtype)
        if level == ENSEMBLE_KEY:
            raw = rm.score_ensemble(latents, prompt_embeds=cond, us=settings.ensemble, noise=eps)
        else:
            raw = rm.score_conditioning(latents, cond, u=float(level), noise=eps)
        total += raw.float()
    return (total / settings.n_noise).cpu()


def _bucket_batches(dataset: PairDataset, positions: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Fixed-order batches of one latent size each."""
    index = dataset.index
    keys = index.height[positions] * 1_000_000 + index.width[positions]
    batches = []
    for key in np.unique(keys):
        members = positions[keys == key]
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


@dataclass
class PairScores:
    """Per-level raw scores of a pair set (``chosen[level]``, ``rejected[level]`` (N,)) and vote counts."""

    chosen: dict[str, np.ndarray]
    rejected: dict[str, np.ndarray]
    votes_chosen: np.ndarray
    votes_rejected: np.ndarray
    prompts: list[str] = field(default_factory=list)

    def accuracy(self) -> dict[str, float]:
        return {k: pair_accuracy(self.chosen[k], self.rejected[k]) for k in self.chosen}

    def observed_preference(self) -> np.ndarray:
        """Target P(chosen preferred): the vote share when votes are known, else 1."""
        vc, vr = self.votes_chosen.astype(np.float64), self.votes_rejected.astype(np.float64)
        known = (vc >= 0) & (vr >= 0) & (vc + vr > 0)
        out = np.ones_like(vc)
        out[known] = vc[known] / (vc[known] + vr[known])
        return out


def _score_batch(rm: Any, dataset: PairDataset, encode: EncodeFn, settings: EvalSettings, bi: int,
                 members: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    batch = dataset.batch(members)
    cond = encode(batch.prompts)
    out_c, out_r = {}, {}
    for li, level in enumerate(settings.levels()):
        g = _generator(settings.seed, li, bi)
        shape = (settings.n_noise, *batch.chosen.shape)
        noise_c = torch.randn(shape, generator=g)
        noise_r = noise_c if settings.shared_noise else torch.randn(shape, generator=g)
        out_c[level] = score_latents(rm, batch.chosen, cond, level, settings, g, noise_c).numpy()
        out_r[level] = score_latents(rm, batch.rejected, cond, level, settings, g, noise_r).numpy()
    return out_c, out_r, list(batch.prompts)


def score_pairs(
    rm: Any,
    dataset: PairDataset,
    encode: EncodeFn,
    settings: EvalSettings,
    positions: Sequence[int] | np.ndarray | None = None,
    progress: bool = False,
    accelerator: Any = None,
) -> PairScores:
    """Score every pair (chosen and rejected) at every level of ``settings``, deterministically.

    With a multi-process ``accelerator`` the batches are split over processes (every process runs the
    same number of forwards, so sharded models stay in lock-step) and the scores are gathered; every
    process returns the complete result.
    """
    from tqdm.auto import tqdm

    positions = np.arange(len(dataset)) if positions is None else np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        raise ValueError("no pairs to evaluate")
    batches = _bucket_batches(dataset, positions, settings.batch_size)
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    mine = list(range(rank, len(batches), world))
    rounds = -(-len(batches) // world)
    results: list[tuple[int, Any]] = []
    for r in tqdm(range(rounds), desc="eval pairs", disable=not progress, leave=False):
        bi = mine[r] if r < len(mine) else (mine[-1] if mine else 0)  # padding round: same forwards on all
        out = _score_batch(rm, dataset, encode, settings, bi, batches[bi])
        if r < len(mine):
            results.append((bi, out))
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    results.sort(key=lambda item: item[0])
    levels = settings.levels()
    out_c = {k: np.concatenate([o[0][k] for _, o in results]) for k in levels}
    out_r = {k: np.concatenate([o[1][k] for _, o in results]) for k in levels}
    prompts_all = [p for _, o in results for p in o[2]]
    order = np.concatenate([batches[bi] for bi, _ in results])
    idx = dataset.index
    return PairScores(out_c, out_r, idx.votes_chosen[order].copy(), idx.votes_rejected[order].copy(), prompts_all)


@dataclass
class RankedSet:
    """One prompt with N >= 2 latents (N, C, h, w) and their human ranks (1 = best; equal = tie)."""

    prompt: str
    latents: torch.Tensor
    ranks: list[float]

    def __post_init__(self) -> None:
        if self.latents.dim() != 4 or self.latents.shape[0] != len(self.ranks):
            raise ValueError(
                f"ranked set {self.prompt!r}: latents {tuple(self.latents.shape)} do not match {len(self.ranks)} ranks"
            )


def load_ranked_sets(path: str | os.PathLike, pipe: Any, *, seed: int = 0) -> list[RankedSet]:
    """Read a jsonl of ``{"prompt", "images": [paths], "ranks": [1, 2, ...]}`` and VAE-encode the images.

    Relative image paths are resolved against the jsonl's folder. Encoding samples the VAE
    posterior with a seeded generator (as in the reward model's training data).
    """
    from dinalrm_align.reward_model.images import encode_images

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ranked-set file not found: {path}")
    sets = []
    g = torch.Generator().manual_seed(seed)
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not valid JSON: {exc}") from exc
        missing = [k for k in ("prompt", "images", "ranks") if k not in row]
        if missing:
            raise ValueError(f"{path}:{number} lacks field(s) {missing} (needs prompt, images, ranks)")
        images = [p if Path(p).is_absolute() else str(path.parent / p) for p in row["images"]]
        latents = encode_images(pipe, images, sample_posterior=True, generator=g)
        if len({tuple(z.shape) for z in latents}) != 1:
            raise ValueError(f"{path}:{number}: the images of one ranked set must share a size")
        sets.append(RankedSet(row["prompt"], torch.stack(latents), [float(r) for r in row["ranks"]]))
    if not sets:
        raise ValueError(f"{path} holds no ranked sets")
    return sets


def evaluate_ranked_sets(
    rm: Any, sets: Sequence[RankedSet], encode: EncodeFn, settings: EvalSettings
) -> dict[str, dict[str, float]]:
    """Per level: ``{"accuracy", "correct", "total"}`` pooled over all sets (ties count as wrong)."""
    levels = settings.levels()
    counts = {k: [0, 0] for k in levels}
    for si, ranked in enumerate(sets):
        cond = encode([ranked.prompt] * ranked.latents.shape[0])
        for li, level in enumerate(levels):
            g = _generator(settings.seed, li, si)
            scores = score_latents(rm, ranked.latents, cond, level, settings, g).numpy()
            c, t = ranked_pair_counts(scores, ranked.ranks)
            counts[level][0] += c
            counts[level][1] += t
    return {
        k: {"accuracy": (c / t if t else float("nan")), "correct": c, "total": t} for k, (c, t) in counts.items()
    }


# ----------------------------------------------------------------------------------------------
# Reports and plots
# ----------------------------------------------------------------------------------------------


def settings_dict(settings: EvalSettings) -> dict[str, Any]:
    data = asdict(settings)
    data["us"] = list(settings.us)
    data["ensemble"] = list(settings.ensemble) if settings.ensemble else None
    return data


def write_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot_accuracy_vs_u(
    curves: dict[str, dict[str, float]], path: str | os.PathLike, title: str = "Pairwise accuracy vs noise level"
) -> Path:
    """One line per curve name over the numeric levels; the ensemble as a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for ci, (name, acc) in enumerate(curves.items()):
        numeric = sorted((float(k), v) for k, v in acc.items() if k != ENSEMBLE_KEY)
        color = f"C{ci}"
        if numeric:
            ax.plot([u for u, _ in numeric], [100 * v for _, v in numeric], "o-", color=color, label=name)
        if ENSEMBLE_KEY in acc:
            ax.axhline(100 * acc[ENSEMBLE_KEY], color=color, ls="--", lw=1, label=f"{name} ensemble")
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("noise level u (sigma)")
    ax.set_ylabel("pairwise accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(
    diagrams: dict[str, list[dict[str, float]]], path: str | os.PathLike, title: str = "Reliability diagram"
) -> Path:
    """Mean predicted vs observed preference per bin (from :func:`calibration.reliability_bins`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    for ci, (name, bins) in enumerate(diagrams.items()):
        used = [b for b in bins if b["count"] > 0]
        ax.plot([b["mean_predicted"] for b in used], [b["mean_observed"] for b in used], "o-", color=f"C{ci}", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted P(preferred)")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
