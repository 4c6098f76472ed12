"""Why alignment moves the golden reward as far as it does: two diagnostics of a trained latent reward model.

``python -m benchmarks.alignment_diagnostics --rm runs/alignment/reward_model/final`` rebuilds the colour world
(deterministic: the experiment's defaults) and measures, on the held-out prompts' base samples:

* **reward ascent**: the golden reward after optimising the latents themselves by gradient ascent on the
  learned reward (Adam, 60 steps), (a) in every latent direction and (b) only along the three colour tints.
  No policy is involved: this is how far following the reward model's gradient can move the truth. Also the
  cosine between the reward model's and the golden reward's latent gradients, and the share of the reward
  gradient's energy in the tint directions, in other spatially constant offsets and in spatial patterns;
* **group resolution** (what GRPO relies on): groups of SDE samples of one prompt (the GRPO sampler of the
  experiment): the within-group standard deviation of the golden reward and the within-group Pearson
  correlation of the learned reward (mean of 8 noise draws, and 1 draw) with the golden reward.

Writes ``benchmarks/results/alignment_diagnostics.json`` and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.alignment_rewards import decode_differentiable  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _setup(rm_dir: str, out: Path, backbone: str) -> tuple[Any, Any, Any, Any, Any]:
    from dinalrm_align.backbones.registry import adapter_for
    from dinalrm_align.demo import stages
    from dinalrm_align.demo.config import ColourWorldConfig
    from dinalrm_align.reward_model.model import LatentRewardModel

    cfg = ColourWorldConfig(out_dir=str(out), backbone=backbone, progress=False, num_threads=1)
    torch.set_num_threads(1)
    world = stages.build_world(cfg, out)
    rm = LatentRewardModel.from_pretrained(rm_dir, transformer=world.pipe.transformer).eval().requires_grad_(False)
    return cfg, world, adapter_for(world.pipe), rm, world.pipe


def reward_ascent(rm_dir: str, out: Path, backbone: str = "sd3", steps: int = 60) -> dict[str, Any]:
    """Golden reward along direct latent ascent on the learned reward (see the module docstring)."""
    from dinalrm_align.demo.pairs import sample_policy
    from dinalrm_align.reward_model.text import encode_conditioning

    cfg, world, adapter, rm, pipe = _setup(rm_dir, out, backbone)
    prompts = list(world.eval_prompts)
    z0 = sample_policy(pipe, prompts, [4321 + cfg.seed + i for i in range(len(prompts))], latent_shape=world.latent_shape,
                       num_steps=cfg.num_steps, max_sequence_length=cfg.max_sequence_length)
    cond = encode_conditioning(pipe, prompts, cfg.max_sequence_length, dtype=torch.float32)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))

    def golden(z: torch.Tensor) -> float:
        with torch.no_grad():
            return float(world.optics.golden(decode_differentiable(pipe, adapter, z), prompts).mean())

    result: dict[str, Any] = {"golden_start": golden(z0)}
    for mode in ("all directions", "tints only"):
        param = torch.zeros(len(prompts), 3) if mode == "tints only" else torch.zeros_like(z0)
        param.requires_grad_(True)
        opt = torch.optim.Adam([param], lr=0.1 if mode == "tints only" else 0.05)
        curve = []
        for it in range(steps + 1):
            z = z0 + (world.optics.tint(param) if mode == "tints only" else param)
            score = rm.score_conditioning(z, cond, u=0.4, noise=noise)
            if it % 10 == 0:
                curve.append({"step": it, "learned": float(score.detach().mean()), "golden": golden(z.detach())})
            opt.zero_grad()
            (-score.sum()).backward()
            opt.step()
        result[mode] = {"curve": curve, "golden_peak": max(c["golden"] for c in curve)}
    z = z0.clone().requires_grad_(True)
    rm.score_conditioning(z, cond, u=0.4, noise=noise).sum().backward()
    g_rm = z.grad
    zg = z0.clone().requires_grad_(True)
    world.optics.golden(decode_differentiable(pipe, adapter, zg), prompts).sum().backward()
    g_gold = zg.grad
    basis, _ = torch.linalg.qr(torch.tensor(world.optics.directions).T, mode="complete")

    def shares(g: torch.Tensor) -> dict[str, float]:
        const = g.mean(dim=(2, 3))
        n_pix = g.shape[2] * g.shape[3]
        total = (g ** 2).sum((1, 2, 3))
        const_e = (const ** 2).sum(1) * n_pix
        tint_e = ((const @ basis)[:, :3] ** 2).sum(1) * n_pix
        return {"tints": float((tint_e / total).mean()), "other constant offsets": float(((const_e - tint_e) / total).mean()),
                "spatial patterns": float(((total - const_e) / total).mean())}

    result["gradient"] = {
        "cosine_learned_golden": float(torch.nn.functional.cosine_similarity(g_rm.flatten(1), g_gold.flatten(1)).mean()),
        "learned_energy": shares(g_rm), "golden_energy": shares(g_gold),
    }
    return result


def group_resolution(rm_dir: str, out: Path, backbone: str = "sd3", prompts_n: int = 8, group: int = 4) -> dict[str, Any]:
    """Within-group golden spread and learned-vs-golden correlation of SDE sample groups (GRPO's signal)."""
    from benchmarks.alignment import GRPO_SECTION
    from dinalrm_align.demo.world import decode
    from dinalrm_align.reward_model.text import encode_conditioning
    from dinalrm_align.sampling.rollout import Denoiser, sde_rollout

    cfg, world, adapter, rm, pipe = _setup(rm_dir, out, backbone)
    prompts = [p for p in world.train_prompts[:prompts_n] for _ in range(group)]
    cond = encode_conditioning(pipe, prompts, cfg.max_sequence_length, dtype=torch.float32)
    sigmas, _ = adapter.inference_schedule(pipe.scheduler.config, cfg.num_steps, world.latent_shape[1:])
    g = torch.Generator().manual_seed(0)
    lo, hi = GRPO_SECTION["sde_window_range"]
    with torch.no_grad():
        embedded = adapter.default_embedded_guidance if adapter.guidance_embedded(pipe.transformer) else None
        traj = sde_rollout(Denoiser(adapter, pipe.transformer, guidance=embedded), torch.randn(len(prompts), *world.latent_shape, generator=g),
                           sigmas, cond, sde_type=GRPO_SECTION["sde_type"], noise_level=GRPO_SECTION["noise_level"],
                           sde_window=(lo, lo + GRPO_SECTION["sde_window_size"]), generator=g)
        z = traj.final_latents
        gold = world.optics.golden(decode(pipe, z), prompts).reshape(prompts_n, group)
        draws = torch.stack([rm.score_conditioning(z, cond, u=0.4, generator=torch.Generator().manual_seed(s))
                             for s in range(8)])
    mean8 = draws.mean(0).reshape(prompts_n, group)
    one = draws[0].reshape(prompts_n, group)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.stack([torch.corrcoef(torch.stack([a[i], b[i]]))[0, 1] for i in range(a.shape[0])]).nanmean())

    return {"golden_within_group_std": float(gold.std(1).mean()), "golden_between_prompt_std": float(gold.mean(1).std()),
            "learned_noise_std_same_latent": float(draws.std(0).mean()),
            "within_group_corr_mean_of_8_draws": corr(gold, mean8), "within_group_corr_1_draw": corr(gold, one),
            "prompts": prompts_n, "group_size": group}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.alignment_diagnostics", description=__doc__.split("\n\n")[0])
    p.add_argument("--rm", required=True, help="a trained colour-world reward model folder (e.g. runs/alignment/reward_model/final)")
    p.add_argument("--backbone", choices=("sd3", "flux", "zimage"), default="sd3")
    p.add_argument("--out", default="runs/alignment_diagnostics", help="work folder (the rebuilt world)")
    p.add_argument("--json", default=str(RESULTS / "alignment_diagnostics.json"))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not Path(args.rm).is_dir():
        p.error(f"reward model folder not found: {args.rm}")
    out = Path(args.out)
    data = {"rm": args.rm, "backbone": args.backbone, "reward_ascent": reward_ascent(args.rm, out, args.backbone),
            "group_resolution": group_resolution(args.rm, out, args.backbone)}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    a, r = data["reward_ascent"], data["group_resolution"]
    print(f"golden at the start {a['golden_start']:.3f}; ascent on the learned reward: every direction peaks at "
          f"{a['all directions']['golden_peak']:.3f}, tints only at {a['tints only']['golden_peak']:.3f}")
    gr = a["gradient"]
    print(f"cosine(learned, golden gradient) {gr['cosine_learned_golden']:.3f}; learned gradient energy "
          + ", ".join(f"{k} {100 * v:.0f} %" for k, v in gr["learned_energy"].items()) + "; golden gradient energy "
          + ", ".join(f"{k} {100 * v:.0f} %" for k, v in gr["golden_energy"].items()))
    print(f"GRPO groups: golden within-group std {r['golden_within_group_std']:.4f}; within-group correlation of the "
          f"learned with the golden reward {r['within_group_corr_mean_of_8_draws']:.2f} (mean of 8 noise draws), "
          f"{r['within_group_corr_1_draw']:.2f} (1 draw)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
