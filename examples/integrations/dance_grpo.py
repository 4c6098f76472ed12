"""DanceGRPO: the reward call inside its sampling loop, on latents (FLUX packed ones by default).

DanceGRPO samples in chunks (one sample at a time in its FLUX script), scores each chunk right after
sampling, appends the chunk's (b,) reward tensor to a list, concatenates it and casts it to float32, then
normalises rewards per group of ``num_generations`` samples. This script rebuilds that loop for one prompt
group with the latent reward in place of decode + image reward, and prints the rewards and advantages.

    python examples/integrations/dance_grpo.py --tiny [--backbone flux|sd3|zimage]
"""

from __future__ import annotations

import argparse
import json

import torch
from _setup import add_model_args, load_models, sample_trajectory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, default_backbone="flux")
    p.add_argument("--num-generations", type=int, default=3)
    args = p.parse_args(argv)

    from dinalrm_align.integrations import dance_grpo_latent_reward_fn

    pipeline, model, adapter, s = load_models(args, p)
    h = w = s["size"]
    reward_fn = dance_grpo_latent_reward_fn(model, pipeline, u=0.4, max_sequence_length=s["seq_len"])

    caption = ["a green tree"] * args.num_generations  # one prompt repeated num_generations times
    all_rewards = []
    for index in range(len(caption)):  # batch_size = 1 chunks, as in the FLUX script
        batch_caption = caption[index:index + 1]
        _, trajectory = sample_trajectory(pipeline, adapter, batch_caption, backbone=args.backbone,
                                          steps=s["steps"], size=h, seq_len=s["seq_len"], seed=index)
        latents = trajectory[-1]  # the final (packed for FLUX) latents of this chunk
        all_rewards.append(reward_fn(latents, batch_caption, height=h, width=w))
    rewards = torch.cat(all_rewards, dim=0).to(torch.float32)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    print(json.dumps({"backbone": args.backbone, "chunk_latents_shape": list(latents.shape)}))
    print(json.dumps({"rewards": [round(float(x), 6) for x in rewards],
                      "advantages": [round(float(x), 4) for x in advantages]}))
    return 0 if bool(torch.isfinite(rewards).all()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
