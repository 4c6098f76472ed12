"""Deterministic evaluation of a policy on held-out prompts: ODE samples, learned and proxy rewards,
a captioned image grid, a per-sample table and a reward-hacking monitor.

Every eval prompt ``i`` always gets the same start noise (seed ``eval.seed + i``) and the same reward
noise, drawn on the CPU, so evaluations at different steps, on different devices or process counts are
comparable. Prompts are split round-robin over processes with equal batch counts on every process
(padding), which keeps collective ops (ZeRO-3 gathers) in lock-step. Nothing here touches the global
RNGs, so evaluating does not change the training trajectory.

Hacking monitor: with proxy rewards (a held-out golden or proxy scorer) every evaluation logs, per
proxy, ``eval/hacking_gap/<name>``: how much more the learned reward has risen than the proxy since the
first evaluation, both in units of their first-evaluation standard deviation across prompts. The stop
rule (``eval.stop_on_hacking``) fires when, between two evaluations, the learned reward rose and a proxy
fell, each by more than ``eval.hacking_margin`` of those standard deviations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinalrm_align.algorithms.base import EvalResult
from dinalrm_align.backbones.registry import import_object
from dinalrm_align.trainer.config import EvalConfig, ProxyRewardConfig
from dinalrm_align.trainer.grid import captioned_grid

ProxyFn = Callable[[torch.Tensor, list[str]], Any]

__all__ = ["Evaluator", "HackingMonitor", "ProxyReward", "check_proxy_rewards", "load_proxy_rewards"]


@dataclass
class ProxyReward:
    """A resolved evaluation-only (or extra) reward."""

    name: str
    inputs: str
    fn: ProxyFn
    monitor: bool = True  # may fire the reward-hacking stop rule

    def __call__(self, inputs: torch.Tensor, prompts: list[str]) -> list[float]:
        out = self.fn(inputs, prompts)
        if isinstance(out, tuple):  # (scores, info) convention of ddpo / flow-grpo rewards
            out = out[0]
        if isinstance(out, dict):
            out = out.get("avg", next(iter(out.values())))
        values = torch.as_tensor(np.asarray(out.detach().cpu() if torch.is_tensor(out) else out, dtype=np.float64))
        values = values.reshape(-1)
        if values.numel() != len(prompts):
            raise ValueError(f"proxy reward {self.name!r} returned {values.numel()} scores for {len(prompts)} inputs")
        return [float(v) for v in values]


def check_proxy_rewards(configs: Sequence[ProxyRewardConfig]) -> None:
    """Import every proxy reward's target (cheap: factories are not called), so a bad path fails early."""
    for cfg in configs:
        if not callable(import_object(cfg.target)):
            raise ValueError(f"proxy reward {cfg.target!r} is not callable")


def load_proxy_rewards(configs: Sequence[ProxyRewardConfig]) -> list[ProxyReward]:
    """Import (and for factories, build) every proxy reward now."""
    proxies = []
    for cfg in configs:
        obj = import_object(cfg.target)
        if cfg.factory:
            fn = obj(**cfg.kwargs)
        elif cfg.kwargs:
            kwargs = dict(cfg.kwargs)

            def fn(x, p, _obj=obj, _kw=kwargs):  # noqa: ANN001
                return _obj(x, p, **_kw)

        else:
            fn = obj
        if not callable(fn):
            raise ValueError(f"proxy reward {cfg.target!r} is not callable")
        proxies.append(ProxyReward(cfg.name, cfg.inputs, fn, cfg.monitor))
    return proxies


class HackingMonitor:
    """Learned-vs-proxy gap and the stop rule (see the module docstring)."""

    def __init__(self, margin: float = 0.0) -> None:
        self.margin = margin
        self.first: dict[str, tuple[float, float]] = {}
        self.previous: dict[str, float] = {}

    def update(self, learned: Sequence[float], proxies: dict[str, Sequence[float]],
               watched: set[str] | None = None) -> tuple[dict[str, float], str | None]:
        """``(metrics, stop_reason)`` for one evaluation's per-prompt values; only proxies in ``watched``
        (default: all) can give a stop reason."""
        values = {"learned": list(learned), **{k: list(v) for k, v in proxies.items()}}
        means = {k: float(np.mean(v)) for k, v in values.items()}
        for key, v in values.items():
            self.first.setdefault(key, (means[key], max(float(np.std(v)), 1e-8)))
        metrics: dict[str, float] = {}
        reason = None
        m0, s0 = self.first["learned"]
        rise = (means["learned"] - m0) / s0
        for name in proxies:
            p0, ps = self.first[name]
            metrics[f"eval/hacking_gap/{name}"] = rise - (means[name] - p0) / ps
            if name in self.previous and "learned" in self.previous:
                learned_up = (means["learned"] - self.previous["learned"]) / s0 > self.margin
                proxy_down = (self.previous[name] - means[name]) / ps > self.margin
                if learned_up and proxy_down and reason is None and (watched is None or name in watched):
                    reason = (f"reward hacking: the learned reward rose while proxy '{name}' fell "
                              f"({self.previous[name]:.4f} -> {means[name]:.4f})")
        self.previous = means
        return metrics, reason


class Evaluator:
    """Evaluates a policy context (duck-typed: ``accelerator``, ``adapter``, ``pipeline``, ``transformer``,
    ``encode``, ``negative``, ``latent_shape``, ``denoiser``, ``score_reward``, ``normalize_reward``).

    Args:
        prompts: held-out prompts (order defines their seeds).
        run_dir: grids go to ``run_dir/eval/step_XXXXXX.png``.
        config: the ``eval`` section.
        proxies: evaluation-only rewards.
    """

    def __init__(self, prompts: Sequence[str], run_dir: str | Path, config: EvalConfig,
                 proxies: Sequence[ProxyReward] = ()) -> None:
        self.prompts = list(prompts)
        self.out_dir = Path(run_dir) / "eval"
        self.config = config
        self.proxies = list(proxies)
        self.monitor = HackingMonitor(config.hacking_margin)

    def _noise(self, index: int, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed + offset + index)
        return torch.randn(shape, generator=g)

    @torch.no_grad()
    def _rows(self, ctx: Any) -> list[dict[str, Any]]:
        from dinalrm_align.sampling.rollout import ode_rollout

        cfg = self.config
        acc = ctx.accelerator
        rank, world = acc.process_index, acc.num_processes
        mine = list(range(rank, len(self.prompts), world))
        n_batches = math.ceil(math.ceil(len(self.prompts) / world) / cfg.batch_size)
        sigmas = ctx.schedule(cfg.num_steps)
        n_noise = ctx.config.reward.n_noise
        need_images = cfg.images or any(p.inputs == "images" for p in self.proxies)
        rows: list[dict[str, Any]] = []
        for b in range(n_batches):
            idx = mine[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            real = len(idx)
            if real == 0:  # padding batch: every process makes the same number of forwards
                idx = [0]
            prompts = [self.prompts[i] for i in idx]
            cond = ctx.encode(prompts)
            noise = torch.stack([self._noise(i, ctx.latent_shape) for i in idx]).to(ctx.device)
            denoiser = ctx.denoiser(ctx.transformer, guidance_scale=cfg.guidance_scale, batch=len(idx))
            with ctx.autocast():
                latents = ode_rollout(denoiser, noise, sigmas, cond).float()
            rm_noise = torch.stack(
                [self._noise(i, (n_noise, *ctx.reward_latent_shape), offset=10_000_019) for i in idx], dim=1
            ).to(ctx.device)
            raw = ctx.score_reward(latents, cond, prompts, noise=rm_noise).float()
            norm = ctx.normalize_reward(raw)
            images = ctx.adapter.decode(ctx.pipeline, latents) if need_images else None
            proxy_scores = {p.name: p(images if p.inputs == "images" else latents, prompts) for p in self.proxies}
            pix = list((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()) \
                if (cfg.images and images is not None) else [None] * len(idx)
            for j in range(real):
                rows.append({"index": idx[j], "raw": float(raw[j]), "norm": float(norm[j]),
                             "proxy": {k: v[j] for k, v in proxy_scores.items()}, "image": pix[j]})
        if world > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        return sorted(rows, key=lambda r: r["index"])

    def evaluate(self, ctx: Any, step: int) -> EvalResult | None:
        """Sample, score and (on the main process) aggregate, write the grid and return the result."""
        if not self.prompts:
            return None
        rows = self._rows(ctx)
        if not ctx.accelerator.is_main_process:
            return EvalResult({})
        raws = [r["raw"] for r in rows]
        metrics = {
            "eval/reward_raw": float(np.mean(raws)),
            "eval/reward_raw_std": float(np.std(raws)),
            "eval/reward_norm": float(np.mean([r["norm"] for r in rows])),
        }
        proxies = {p.name: [r["proxy"][p.name] for r in rows] for p in self.proxies}
        for name, values in proxies.items():
            metrics[f"eval/proxy/{name}"] = float(np.mean(values))
        watched = {p.name for p in self.proxies if p.monitor}
        gap, reason = self.monitor.update(raws, proxies, watched)
        metrics.update(gap)
        prompts = [self.prompts[r["index"]] for r in rows]
        table = []
        for p, r in zip(prompts, rows):
            entry = {"prompt": p, "reward": r["raw"], "reward_norm": r["norm"], **r["proxy"]}
            if r["image"] is not None:
                from PIL import Image

                entry["image"] = Image.fromarray(r["image"])
            table.append(entry)
        grid_path = None
        if self.config.images and rows and rows[0]["image"] is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            grid_path = self.out_dir / f"step_{step:06d}.png"
            captions = [
                [p, f"reward {r['raw']:.3f}"] + [f"{k} {v:.3f}" for k, v in r["proxy"].items()]
                for p, r in zip(prompts, rows)
            ]
            captioned_grid([r["image"] for r in rows], captions, self.config.grid_columns).save(grid_path)
        headline = ["eval/reward_raw", "eval/reward_norm"] + [f"eval/proxy/{n}" for n in proxies]
        stop = reason if self.config.stop_on_hacking else None
        return EvalResult(metrics, grid_path, table, headline, stop)
