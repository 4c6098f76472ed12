"""Flow-GRPO, latent-native: the sampler's final latents go to DiNa-LRM, no VAE decode + re-encode.

The lines to change in Flow-GRPO's SD3 training script are in docs/integrations.md. This script rebuilds
the trainer's side of the contract in a few lines (its sampler returns a list of per-step latents that the
script stacks to (B, T+1, C, h, w); the reward runs in a thread pool; every returned value becomes a tensor
with torch.as_tensor) and runs one reward call, then the same with a Flow-GRPO-style image reward mixed in.

    python examples/integrations/flow_grpo_latent.py --tiny [--backbone sd3|flux|zimage]
"""

from __future__ import annotations

import argparse
import json
from concurrent import futures

import torch
from _setup import add_model_args, load_models, sample_trajectory


def brightness_multi_score(device: str, score_dict: dict[str, float]):
    """A stand-in for Flow-GRPO's ``multi_score`` with one image reward ("brightness", mean pixel value)."""

    def _fn(images, prompts, metadata, only_strict=True):
        scores = {"brightness": images.float().mean(dim=(1, 2, 3)).cpu().numpy()}
        scores["avg"] = sum(w * scores[n] for n, w in score_dict.items())
        return scores, {}

    return _fn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    args = p.parse_args(argv)

    from dinalrm_align.integrations import flow_grpo_latent_multi_score, flow_grpo_latent_reward_fn
    from dinalrm_align.rewards import DiNaLatentReward

    pipeline, model, adapter, s = load_models(args, p)
    size, device = s["size"], s["device"]

    # --- the training script's reward function (height/width: only used to unpack FLUX latents)
    reward_fn = flow_grpo_latent_reward_fn(model, pipeline, u=0.4, normalization="fork",
                                           max_sequence_length=s["seq_len"], height=size, width=size)

    # --- one sampling batch as Flow-GRPO produces it: k=2 images per prompt
    prompts = ["a red cube", "a red cube", "a blue ball", "a blue ball"]
    prompt_metadata = [{} for _ in prompts]
    images, trajectory = sample_trajectory(pipeline, adapter, prompts, backbone=args.backbone, steps=s["steps"],
                                           size=size, seq_len=s["seq_len"])
    latents = torch.stack(trajectory, dim=1)  # (B, T+1, ...), as the script stacks the sampler's list

    executor = futures.ThreadPoolExecutor(max_workers=2)
    rewards = executor.submit(reward_fn, latents[:, -1], prompts, prompt_metadata, only_strict=True)
    rewards, reward_metadata = rewards.result()
    rewards = {key: torch.as_tensor(value, device=device).float() for key, value in rewards.items()}
    print(json.dumps({"backbone": args.backbone, "trajectory_shape": list(latents.shape),
                      "final_latents_shape": list(latents[:, -1].shape)}))
    print(json.dumps({f"reward_{k}": [round(float(x), 6) for x in v] for k, v in rewards.items()}))

    # --- the same scores as the package's reward called directly on the unpacked final latents
    direct = DiNaLatentReward(model, pipeline, u=0.4, normalization="fork", max_sequence_length=s["seq_len"])
    final = adapter.unpack_pipeline_latents(pipeline, trajectory[-1], size, size)
    same = torch.allclose(direct(latents=final, prompts=prompts).to(device), rewards["dinalrm"], atol=1e-6)

    # --- mixed with an image reward under one {name: weight} dict (DiNa-LRM + 0.2 x brightness)
    mixed_fn = flow_grpo_latent_multi_score(
        {"dinalrm": 1.0, "brightness": 0.2}, {"dinalrm": reward_fn},
        image_reward_fn=brightness_multi_score(device, {"brightness": 1.0}),
    )
    mixed, _ = executor.submit(mixed_fn, latents[:, -1], prompts, prompt_metadata, only_strict=True,
                               images=images).result()
    executor.shutdown()
    print(json.dumps({f"mixed_reward_{k}": [round(float(x), 6) for x in v] for k, v in mixed.items()}))
    print(json.dumps({"matches_direct_reward": bool(same)}))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
