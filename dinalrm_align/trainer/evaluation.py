"""Deterministic evaluation on held-out prompts: ODE samples, reward, proxy rewards, image grid.

Every eval prompt ``i`` always gets the same start noise (seed ``eval.seed + i``) and the same
reward noise, drawn on the CPU, so evaluations at different steps, on different devices or process
counts are comparable. Prompts are split round-robin over processes with equal batch counts on
every process (padding), which keeps collective ops (ZeRO-3 gathers) in lock-step. Nothing here
touches the global RNGs, so evaluating does not change the training trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dinalrm_align.algorithms.base import import_object
from dinalrm_align.trainer.config import ProxyRewardConfig

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from dinalrm_align.algorithms.base import TrainContext

ProxyFn = Callable[[torch.Tensor, list[str]], Any]


@dataclass
class ProxyReward:
    """A resolved evaluation-only reward."""

    name: str
    inputs: str
    fn: ProxyFn

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
    """Import every proxy reward now (so a bad import path fails before training starts)."""
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
        proxies.append(ProxyReward(cfg.name, cfg.inputs, fn))
    return proxies


def decode_latents(pipeline: Any, latents: torch.Tensor) -> torch.Tensor:
    """SD3-normalised latents (B, 16, h, w) -> images (B, 3, H, W) float32 in [0, 1] (no grad)."""
    vae = pipeline.vae
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        images = vae.decode(z, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def make_grid(images: Sequence[np.ndarray], columns: int) -> Image.Image:
    """uint8 HWC images -> one PIL grid image (row-major)."""
    from PIL import Image

    if not images:
        raise ValueError("no images for the grid")
    h, w = images[0].shape[:2]
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return Image.fromarray(grid)


def _to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


@dataclass
class EvalOutput:
    """Result of one evaluation (complete on the main process; per-process part elsewhere)."""

    step: int
    metrics: dict[str, float]
    prompts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    grid_path: Path | None = None


class Evaluator:
    """Runs :meth:`evaluate` on a fixed prompt list with fixed seeds.

    Args:
        prompts: held-out prompts (order defines their seeds).
        run_dir: grids go to ``run_dir/eval/step_XXXXXX.png``.
        num_steps, guidance_scale: the ODE sampler.
        batch_size: prompts per forward per process.
        seed: base seed; prompt ``i`` uses ``seed + i`` for its start noise.
        images: decode and save an image grid.
        grid_columns: grid width in images.
        proxies: evaluation-only rewards.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        run_dir: str | Path,
        *,
        num_steps: int = 40,
        guidance_scale: float = 4.5,
        batch_size: int = 4,
        seed: int = 1234,
        images: bool = True,
        grid_columns: int = 4,
        proxies: Sequence[ProxyReward] = (),
    ) -> None:
        self.prompts = list(prompts)
        self.out_dir = Path(run_dir) / "eval"
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size
        self.seed = seed
        self.images = images
        self.grid_columns = grid_columns
        self.proxies = list(proxies)

    def _noise(self, index: int, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + offset + index)
        return torch.randn(shape, generator=g)

    @torch.no_grad()
    def evaluate(self, ctx: TrainContext, step: int) -> EvalOutput:
        """Sample, score and (on the main process) aggregate, write the grid and return metrics."""
        from dinalrm_align.sampling.rollout import ode_rollout
        from dinalrm_align.sampling.schedule import inference_schedule

        if not self.prompts:
            return EvalOutput(step, {})
        acc = ctx.accelerator
        rank, world = acc.process_index, acc.num_processes
        mine = list(range(rank, len(self.prompts), world))
        n_batches = math.ceil(math.ceil(len(self.prompts) / world) / self.batch_size)
        sigmas, _ = inference_schedule(ctx.pipeline.scheduler.config, self.num_steps, device=ctx.device)
        n_noise = ctx.config.reward.n_noise
        need_images = self.images or any(p.inputs == "images" for p in self.proxies)
        rows: list[dict[str, Any]] = []
        for b in range(n_batches):
            idx = mine[b * self.batch_size : (b + 1) * self.batch_size]
            real = len(idx)
            if real == 0:  # padding batch: keeps every process doing the same number of forwards
                idx = [0]
            prompts = [self.prompts[i] for i in idx]
            pe, pooled = ctx.encode(prompts)
            neg_pe, neg_pooled = ctx.negative(len(prompts))
            noise = torch.stack([self._noise(i, ctx.latent_shape) for i in idx]).to(ctx.device)
            with ctx.autocast():
                latents = ode_rollout(
                    ctx.transformer, noise, sigmas, pe, pooled,
                    guidance_scale=self.guidance_scale,
                    negative_prompt_embeds=neg_pe,
                    negative_pooled_prompt_embeds=neg_pooled,
                )
                latents = latents.float()
                rm_noise = torch.stack(
                    [self._noise(i, (n_noise, *ctx.latent_shape), offset=10_000_019) for i in idx], dim=1
                ).to(ctx.device)
                raw = ctx.reward_model.score(
                    latents, prompt_embeds=pe, pooled_prompt_embeds=pooled,
                    u=ctx.config.reward.u, noise=rm_noise, n_noise=n_noise,
                ).float()
            norm = ctx.normalize_reward(raw)
            images = decode_latents(ctx.pipeline, latents) if need_images else None
            proxy_scores = {
                p.name: p(images if p.inputs == "images" else latents, prompts) for p in self.proxies
            }
            pix = _to_uint8(images) if (self.images and images is not None) else [None] * len(idx)
            for j in range(real):
                rows.append(
                    {
                        "index": idx[j],
                        "raw": float(raw[j]),
                        "norm": float(norm[j]),
                        "proxy": {k: v[j] for k, v in proxy_scores.items()},
                        "image": pix[j],
                    }
                )
        if world > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        if not acc.is_main_process:
            return EvalOutput(step, {})
        rows = sorted(rows, key=lambda r: r["index"])
        raws = [r["raw"] for r in rows]
        metrics = {
            "eval/reward_raw": float(np.mean(raws)),
            "eval/reward_raw_std": float(np.std(raws)),
            "eval/reward_norm": float(np.mean([r["norm"] for r in rows])),
        }
        for p in self.proxies:
            metrics[f"eval/proxy/{p.name}"] = float(np.mean([r["proxy"][p.name] for r in rows]))
        grid_path = None
        if self.images:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            grid_path = self.out_dir / f"step_{step:06d}.png"
            make_grid([r["image"] for r in rows], self.grid_columns).save(grid_path)
        return EvalOutput(step, metrics, [self.prompts[r["index"]] for r in rows], raws, grid_path)
