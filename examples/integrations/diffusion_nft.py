"""DiffusionNFT: score the clean final latents it already stores, then its per-prompt advantages.

DiffusionNFT keeps Flow-GRPO's reward contract; its SD3 script stacks the sampler's trajectory and stores only
``latents[:, -1]`` as the clean latents it trains on. This script rebuilds that sampling step for one epoch
(two groups of k=2), submits the latent reward to a thread pool as the script submits its reward function,
and prints the rewards and the per-prompt normalised advantages NFT trains with.

    python examples/integrations/diffusion_nft.py --tiny [--backbone sd3|flux|zimage]
"""

from __future__ import annotations

import argparse
import json
from concurrent import futures

import numpy as np
import torch
from _setup import add_model_args, load_models, sample_trajectory


def per_prompt_advantages(prompts: list[str], rewards: np.ndarray) -> np.ndarray:
    """(r - mean of its prompt's group) / (std of the group + 1e-4): the per-prompt normalisation."""
    out = np.zeros_like(rewards)
    for prompt in set(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        group = rewards[idx]
        out[idx] = (group - group.mean()) / (group.std() + 1e-4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    args = p.parse_args(argv)

    from dinalrm_align.integrations import diffusion_nft_latent_reward_fn

    pipeline, model, adapter, s = load_models(args, p)
    size, device = s["size"], s["device"]
    reward_fn = diffusion_nft_latent_reward_fn(model, pipeline, u=0.4, max_sequence_length=s["seq_len"],
                                               height=size, width=size)
    executor = futures.ThreadPoolExecutor(max_workers=2)

    epoch = 0
    reward_fn.set_step(epoch)  # fresh (reproducible) reward noise every epoch
    samples = []
    for i, prompts in enumerate([["a red cube"] * 2, ["a blue ball"] * 2]):
        images, trajectory = sample_trajectory(pipeline, adapter, prompts, backbone=args.backbone,
                                               steps=s["steps"], size=size, seq_len=s["seq_len"], seed=i)
        latents = torch.stack(trajectory, dim=1)
        future = executor.submit(reward_fn, latents[:, -1], prompts, [{} for _ in prompts], only_strict=True)
        samples.append({"latents_clean": latents[:, -1], "prompts": prompts, "rewards_future": future})

    for sample in samples:
        rewards, _ = sample.pop("rewards_future").result()
        sample["rewards"] = {k: torch.as_tensor(v, device=device).float() for k, v in rewards.items()}
    executor.shutdown()
    prompts = [q for sample in samples for q in sample["prompts"]]
    avg = torch.cat([sample["rewards"]["avg"] for sample in samples]).cpu().numpy()
    advantages = per_prompt_advantages(prompts, avg)
    print(json.dumps({"backbone": args.backbone, "latents_clean_shape": list(samples[0]["latents_clean"].shape)}))
    print(json.dumps({"reward_avg": [round(float(x), 6) for x in avg],
                      "advantages": [round(float(x), 4) for x in advantages]}))
    finite = bool(np.isfinite(avg).all() and np.isfinite(advantages).all())
    return 0 if finite else 1


if __name__ == "__main__":
    raise SystemExit(main())
