"""GRPO's rollouts: sampling a whole epoch with log-probs, scoring it, and the per-process buffer it trains on.

Everything here is what happens *before* the policy update: :func:`collect_epoch` draws this process'
rollout batches (stochastic steps inside the SDE window, ODE elsewhere), scores the final clean latents
with the latent reward (no VAE decode, no grad, re-noising seeded per global sample) and the extra rewards,
gathers rewards from all processes, normalises them per prompt and stores this process' kept samples in
a :class:`RolloutBuffer`, split into training chunks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dinalrm_align.backbones.conditioning import TextConditioning
from dinalrm_align.trainer.grouping import prompt_group_ids, stable_hash

__all__ = ["RolloutBuffer", "collect_epoch", "make_chunks", "seeded_normal"]


def make_chunks(keep: torch.Tensor, num_chunks: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Split this process' kept samples into ``num_chunks`` training chunks (index tensors).

    Kept samples (shuffled with ``generator`` if given) are split into ``num_chunks`` chunks whose
    sizes differ by at most one. If fewer than ``num_chunks`` samples are kept, every chunk holds
    one sample and the missing ones are filled with dropped samples (zero advantage), so that every
    process runs the same number of micro-steps (as Flow-GRPO re-adds dropped samples).
    """
    if keep.ndim != 1 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a 1-D bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    if keep.numel() < num_chunks:
        raise ValueError(f"cannot make {num_chunks} chunks from {keep.numel()} samples")
    keep = keep.cpu()
    kept = torch.nonzero(keep).flatten()
    dropped = torch.nonzero(~keep).flatten()
    if generator is not None:
        kept = kept[torch.randperm(kept.numel(), generator=generator)]
        dropped = dropped[torch.randperm(dropped.numel(), generator=generator)]
    if kept.numel() >= num_chunks:
        return [c.clone() for c in torch.tensor_split(kept, num_chunks)]
    filled = torch.cat([kept, dropped[: num_chunks - kept.numel()]])
    return [filled[i : i + 1].clone() for i in range(num_chunks)]


def seeded_normal(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal draws, sample ``i`` from its own CPU generator."""
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        out.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(out)


@dataclass
class RolloutBuffer:
    """This process' rollouts of the current epoch, kept for training.

    Shapes (``N`` samples, ``W`` trained steps, ``U`` distinct prompts on this process):
    ``latents (N, W + 1, C, h, w)`` (the trained transitions are ``latents[:, j] -> latents[:, j + 1]``),
    ``log_probs (N, W)`` float32 (sampling-time), ``sigmas (N, W + 1)`` float32, ``advantages (N,)``,
    ``embed_index (N,)`` into ``cond`` (a :class:`TextConditioning` of ``U`` prompts); ``chunks``: index
    tensors of the training chunks not yet trained.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    advantages: torch.Tensor
    embed_index: torch.Tensor
    cond: TextConditioning
    chunks: list[torch.Tensor]

    _TENSORS: ClassVar[tuple[str, ...]] = ("latents", "log_probs", "sigmas", "advantages", "embed_index")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: getattr(self, k).detach().cpu() for k in self._TENSORS}
        state["cond"] = self.cond.state_dict()
        state["chunks"] = [c.cpu() for c in self.chunks]
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device | str | None = None) -> RolloutBuffer:
        tensors = {k: state[k].to(device) for k in cls._TENSORS}
        cond = TextConditioning.from_state_dict(state["cond"], device)
        return cls(**tensors, cond=cond, chunks=[c.clone() for c in state["chunks"]])


class _EmbeddingStore:
    """Prompt conditionings of one epoch, encoded once per distinct prompt on this process."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.items: list[TextConditioning] = []

    def lookup(self, ctx: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Indices ``(B,)`` of ``prompts`` (new prompts are encoded)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.index]
        if new:
            cond = ctx.encode(new)
            for i, p in enumerate(new):
                self.index[p] = len(self.items)
                self.items.append(cond[i])
        return torch.tensor([self.index[p] for p in prompts], dtype=torch.long, device=ctx.device)

    def all(self) -> TextConditioning:
        """Every stored prompt's conditioning (``U`` rows, padded to the longest)."""
        return TextConditioning.cat(self.items)


@dataclass
class ExtraReward:
    """An extra reward component: positional ``fn(x, prompts)`` or the latent-reward keyword protocol."""

    proxy: Any

    @property
    def name(self) -> str:
        return self.proxy.name

    @property
    def keyword(self) -> bool:
        return hasattr(self.proxy.fn, "required_fields")

    @property
    def needs_images(self) -> bool:
        return not self.keyword and self.proxy.inputs == "images"

    def __call__(self, latents: torch.Tensor, images: torch.Tensor | None, prompts: list[str],
                 cond: TextConditioning) -> torch.Tensor:
        """Scores ``(B,)`` float32 on the CPU."""
        if self.keyword:
            fn = self.proxy.fn
            fields = set(getattr(fn, "required_fields", ())) | set(getattr(fn, "optional_fields", ()))
            available = {"prompts": prompts, "prompt_embeds": cond, "pooled_prompt_embeds": cond.pooled}
            out = fn(latents=latents, **{k: v for k, v in available.items() if k in fields})
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(prompts),):
                raise ValueError(f"reward {self.name!r} returned {getattr(out, 'shape', type(out).__name__)}, "
                                 f"expected a ({len(prompts)},) tensor")
            return out.detach().float().cpu()
        x = images if self.needs_images else latents
        return torch.tensor(self.proxy(x, prompts), dtype=torch.float32)


def _score(algo: Any, ctx: Any, latents: torch.Tensor, cond: TextConditioning, prompts: list[str],
           sample_ids: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reward components ``{name: (B,) float32}`` and the raw latent reward ``(B,)``, no grad."""
    rcfg = ctx.config.reward
    base = ctx.config.seed if algo.config.reward_seed is None else algo.config.reward_seed
    seeds = [stable_hash("grpo-reward", base, s) for s in sample_ids]
    noise = seeded_normal(seeds, (rcfg.n_noise, *ctx.reward_latent_shape)).transpose(0, 1).to(ctx.device)
    raw = ctx.score_reward(latents.float(), cond, prompts, noise=noise).float()
    comps = {algo.config.latent_reward_name: ctx.normalize_reward(raw).float()}
    if algo.extras:
        images = ctx.adapter.decode(ctx.pipeline, latents) if any(e.needs_images for e in algo.extras) else None
        for extra in algo.extras:
            comps[extra.name] = extra(latents, images, prompts, cond).to(ctx.device)
    return comps, raw


@torch.no_grad()
def collect_epoch(algo: Any, ctx: Any, prompts: list[str]) -> tuple[RolloutBuffer, dict[str, Any], dict[str, Any]]:
    """Sample, score, gather and normalise one epoch -> ``(buffer, epoch_metrics, diagnostics)``."""
    from dinalrm_align.algorithms.advantages import GroupAdvantages, compute_advantages, rank_slice
    from dinalrm_align.sampling.rollout import sde_rollout

    cfg, c = ctx.config, algo.config
    bsz, nb, steps = cfg.train.batch_size, c.num_batches_per_epoch, algo.micro_steps_per_batch
    if len(prompts) != nb * bsz:
        raise ValueError(
            f"GRPO expects the epoch's {nb} x {bsz} prompts from its k-repeat sampler, got {len(prompts)}; "
            "the trainer must take its prompt stream from the algorithm"
        )
    acc, device = ctx.accelerator, ctx.device
    sigmas = ctx.schedule(cfg.sampling.num_steps)
    denoiser = ctx.denoiser(ctx.transformer, guidance_scale=algo.guidance(ctx))
    store = _EmbeddingStore()
    lat, lps, sig, eidx, windows = [], [], [], [], []
    comps: dict[str, list[torch.Tensor]] = {}
    raws: list[torch.Tensor] = []
    t0 = time.perf_counter()
    transformer = ctx.transformer
    was_training = transformer.training
    transformer.eval()
    try:
        for b in range(nb):
            batch_prompts = prompts[b * bsz : (b + 1) * bsz]
            idx = store.lookup(ctx, batch_prompts)
            cond = TextConditioning.cat([store.items[i] for i in idx.tolist()])
            ids = [algo.global_index(ctx, b, i) for i in range(bsz)]
            z0 = seeded_normal([stable_hash("grpo-z0", cfg.seed, s) for s in ids], ctx.latent_shape).to(device)
            window = algo.window(ctx, b)
            gen = torch.Generator().manual_seed(stable_hash("grpo-sde", cfg.seed, algo.epoch, b, ctx.process_index))
            with ctx.autocast():
                traj = sde_rollout(denoiser, z0, sigmas, cond, sde_type=c.sde_type, noise_level=c.level,
                                   sde_window=window, generator=gen)
            trained = traj.train_steps()[:steps]
            if len(trained) != steps or trained != list(range(trained[0], trained[0] + steps)):
                raise RuntimeError(f"rollout has trainable steps {traj.train_steps()}, expected {steps} consecutive")
            s0 = trained[0]
            lat.append(traj.latents[:, s0 : s0 + steps + 1])
            lps.append(traj.log_probs[:, s0 : s0 + steps].float())
            sig.append(sigmas[s0 : s0 + steps + 1].float().expand(bsz, -1))
            eidx.append(idx)
            windows.append(s0)
            batch_comps, raw = _score(algo, ctx, traj.final_latents, cond, batch_prompts, ids)
            for k, v in batch_comps.items():
                comps.setdefault(k, []).append(v)
            raws.append(raw)
    finally:
        transformer.train(was_training)
    rollout_s = time.perf_counter() - t0

    local = {k: torch.cat(v) for k, v in comps.items()}
    local_raw = torch.cat(raws)
    local_ids = prompt_group_ids(prompts, device=device)
    world, rank = ctx.num_processes, ctx.process_index
    if world > 1:
        gathered = {k: acc.gather(v.contiguous()) for k, v in local.items()}
        gathered_raw = acc.gather(local_raw.contiguous())
        gathered_ids = acc.gather(local_ids)
    else:
        gathered, gathered_raw, gathered_ids = local, local_raw, local_ids
    if all(bool(torch.isfinite(v).all()) for v in gathered.values()):
        res = compute_advantages(gathered, gathered_ids, c.weights, mode=c.advantage_mode, global_std=c.global_std,
                                 adv_clip_max=c.adv_clip_max, filter_zero_std=c.filter_zero_std)
    else:  # a diverged policy / reward: no advantages; the non-finite reward metrics stop the run (TrainingDiverged)
        n = gathered_ids.shape[0]
        res = GroupAdvantages(torch.zeros(n, device=device), torch.zeros(n, dtype=torch.bool, device=device), 0.0, 0)
    adv = rank_slice(res.advantages, rank, world)
    keep = rank_slice(res.keep, rank, world)
    gen = (torch.Generator().manual_seed(stable_hash("grpo-chunks", cfg.seed, algo.epoch, rank))
           if c.shuffle_chunks else None)
    buffer = RolloutBuffer(torch.cat(lat), torch.cat(lps), torch.cat(sig), adv.float(), torch.cat(eidx), store.all(),
                           make_chunks(keep, nb, gen))
    diagnostics = {
        "epoch": algo.epoch, "components": {k: v.detach().cpu() for k, v in local.items()},
        "reward_raw": local_raw.cpu(), "group_ids": local_ids.cpu(), "advantages": adv.cpu(), "keep": keep.cpu(),
        "prompts": list(prompts), "windows": windows,
    }
    return buffer, _epoch_stats(c, gathered, gathered_raw, res, rollout_s, windows, algo.epoch), diagnostics


def _epoch_stats(c: Any, gathered: Mapping[str, torch.Tensor], raw: torch.Tensor, res: Any, rollout_s: float,
                 windows: list[int], epoch: int) -> dict[str, Any]:
    """Epoch-level metrics (identical on every process: computed from gathered values; device tensors)."""
    out: dict[str, Any] = {}
    for name, values in sorted(gathered.items()):
        v = values.double()
        out[f"reward_{name}_mean"] = v.mean()
        out[f"reward_{name}_std"] = v.std(unbiased=False)
    out["reward_raw_mean"] = raw.double().mean()
    out["reward_raw_std"] = raw.double().std(unbiased=False)
    total = sum(w * gathered[k].double() for k, w in c.weights.items())
    out["reward_weighted_mean"] = total.mean()  # type: ignore[union-attr]
    n = res.advantages.numel()
    kept = res.keep
    out["zero_std_ratio"] = res.zero_std_ratio
    out["group_size"] = n / max(res.num_groups, 1)
    out["num_groups"] = float(res.num_groups)
    out["kept_fraction"] = kept.float().mean()
    out["advantage_abs_mean"] = torch.where(kept, res.advantages.abs(), 0.0).sum() / kept.sum().clamp_min(1)
    out["samples_per_s"] = n / max(rollout_s, 1e-9)
    out["rollout_time_s"] = rollout_s
    out["window_start"] = float(sum(windows)) / max(len(windows), 1)
    out["rollout_epoch"] = float(epoch)
    return out
