"""What the alignment experiment's runs share: the colour world, its pair sets, the reward models (latent,
latent on more pairs, pixel), the flow-matching regulariser's dataset and the golden ceiling.

Ceiling (per held-out prompt): the golden reward of the best image reachable from the base policy's own
held-out sample (the trainer's evaluation start noise) by a tint along the world's three colour directions
with every component in [-3, 3] (3 standard deviations of the tints the annotated pairs cover), found by
gradient ascent on the golden reward through the VAE decoder. The absolute maximum, 1.0, needs the exact
target colour, which the decoder's weak third colour axis does not reach within that range.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_env", "golden_ceiling"]


def golden_ceiling(world: Any, cfg: Any, eval_seed: int, bound: float = 3.0, steps: int = 80) -> torch.Tensor:
    """Best golden reward (N,) of the held-out prompts' base samples over tints in ``[-bound, bound]^3``."""
    from benchmarks.alignment_rewards import decode_differentiable
    from dinalrm_align.backbones.registry import adapter_for
    from dinalrm_align.demo.pairs import sample_policy

    prompts = list(world.eval_prompts)
    adapter = adapter_for(world.pipe)
    z = sample_policy(world.pipe, prompts, [eval_seed + i for i in range(len(prompts))], latent_shape=world.latent_shape,
                      num_steps=cfg.num_steps, max_sequence_length=cfg.max_sequence_length)
    tint = torch.zeros(len(prompts), 3, requires_grad=True)
    opt = torch.optim.Adam([tint], lr=0.15)
    best = torch.full((len(prompts),), -1.0)
    for _ in range(steps):
        golden = world.optics.golden(decode_differentiable(world.pipe, adapter, z + world.optics.tint(tint)), prompts)
        best = torch.maximum(best, golden.detach())
        opt.zero_grad()
        (-golden.sum()).backward()
        opt.step()
        with torch.no_grad():
            tint.clamp_(-bound, bound)
    with torch.no_grad():
        golden = world.optics.golden(decode_differentiable(world.pipe, adapter, z + world.optics.tint(tint)), prompts)
    return torch.maximum(best, golden)


def _fm_dataset(cfg: Any, world: Any, path: Path) -> str:
    """Base-policy samples of the training prompts (2 seeds each) for ReFL's flow-matching regulariser."""
    from dinalrm_align.demo.pairs import sample_policy
    from dinalrm_align.trainer.data import save_latent_dataset

    prompts = [p for p in world.train_prompts for _ in range(2)]
    latents = sample_policy(world.pipe, prompts, [700_000 + i for i in range(len(prompts))], latent_shape=world.latent_shape,
                            num_steps=cfg.num_steps, max_sequence_length=cfg.max_sequence_length, cache=world.text_cache)
    return str(save_latent_dataset(path, latents, prompts))


def build_env(cfg: Any, out: Path, *, more_pairs_factor: int = 2, pixel_steps: int = 1500,
              grpo: dict[str, Any] | None = None, log: Any = print, train_more: bool = True,
              train_pixel: bool = True) -> tuple[Any, dict[str, Any]]:
    """World, pairs, reward models (the more-pairs and pixel ones only if asked), fm dataset, ceiling ->
    ``(Env, setup report)``."""
    from benchmarks.alignment_rewards import save_pixel_model, train_pixel_reward_model
    from benchmarks.alignment_runs import Env
    from dinalrm_align.backbones.registry import adapter_for
    from dinalrm_align.demo import stages

    report: dict[str, Any] = {"times_s": {}}
    times = report["times_s"]

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        log(f"[alignment] setup: {name} ...")
        value = fn()
        times[name] = time.perf_counter() - t0
        return value

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out.mkdir(parents=True, exist_ok=True)
    world = timed("world", lambda: stages.build_world(cfg, out))
    pairs = timed("pairs", lambda: stages.build_pairs_stage(cfg, world))
    rm = timed("latent reward model", lambda: stages.stage_reward_model(cfg, out, pairs))
    rm_dirs = {"latent": rm.final_dir}
    if train_more:
        more = timed("more pairs", lambda: stages.build_pairs_stage(
            cfg, world, pairs_per_prompt=cfg.pairs_per_prompt * more_pairs_factor,
            seeds_per_prompt=cfg.seeds_per_prompt * more_pairs_factor, folder="pairs_more", seed_offset=1))
        more_pairs = {"train": more["train"], "eval": pairs["eval"]}
        rm_more = timed("latent reward model (more pairs)", lambda: stages.stage_reward_model(
            cfg, out, more_pairs, run_name="reward_model_more", steps=cfg.rm_steps * more_pairs_factor))
        rm_dirs["latent_more"] = rm_more.final_dir
        report["pairs_more"] = more["train"]["stats"]
        report["latent_rm_more"] = {"accuracy": rm_more.accuracy, "steps": rm_more.steps,
                                    "train_time_s": rm_more.train_time_s}
    pixel, pixel_path = None, None
    if train_pixel:
        adapter = adapter_for(world.pipe)
        pixel, pixel_info = timed("pixel reward model", lambda: train_pixel_reward_model(
            world.pipe, adapter, str(pairs["train"]["folder"]), str(pairs["eval"]["folder"]),
            max_sequence_length=cfg.max_sequence_length, steps=pixel_steps, seed=cfg.seed))
        pixel_path = str(save_pixel_model(pixel, out / "pixel_reward_model.safetensors"))
        report["pixel_rm"] = pixel_info
    fm = timed("fm dataset", lambda: _fm_dataset(cfg, world, out / "fm_dataset.safetensors"))
    eval_seed = 4321 + cfg.seed  # the recipes' eval.seed
    ceiling = timed("ceiling", lambda: golden_ceiling(world, cfg, eval_seed))
    from dinalrm_align.reward_model.model import LatentRewardModel

    latent_rm = LatentRewardModel.from_pretrained(rm.final_dir, transformer=world.pipe.transformer)
    report.update({
        "pairs": {k: v["stats"] for k, v in pairs.items()},
        "latent_rm": {"accuracy": rm.accuracy, "steps": rm.steps, "train_time_s": rm.train_time_s,
                      "params_total": sum(p.numel() for p in latent_rm.parameters()),
                      "params_trainable": sum(p.numel() for n, p in latent_rm.named_parameters()
                                              if "lora_" in n or n.startswith("reward_head."))},
        "ceiling_per_prompt": ceiling.tolist(),
        "ceiling": float(ceiling.mean()),
        "eval_prompts": world.eval_prompts,
    })
    env = Env(cfg, world, out, rm_dirs, pixel, pixel_path, fm, dict(grpo or {}))
    return env, report
