"""DiNa-LRM in a Flow-GRPO / DiffusionNFT training script: the lines to change, then a dry run.

In ``flow_grpo/scripts/train_sd3.py`` (DiffusionNFT's ``train_nft_sd3.py`` is the same)::

    # before
    reward_fn = getattr(flow_grpo.rewards, "multi_score")(accelerator.device, config.reward_fn)
    eval_reward_fn = getattr(flow_grpo.rewards, "multi_score")(accelerator.device, config.reward_fn)

    # after (the pipeline is the policy's own; the reward copies its first 12 blocks)
    from dinalrm_align.rewards import flow_grpo_reward
    reward_fn = flow_grpo_reward("liuhuohuo/DiNa-LRM-SD35M-12layers", pipeline, u=0.4,
                                 normalization="fork",            # (raw + 12) / 10 as the upstream fork
                                 torch_dtype=torch.bfloat16, device=accelerator.device)
    eval_reward_fn = reward_fn
    # once per epoch (optional): new, still reproducible, reward noise
    reward_fn.set_step(epoch)

Nothing else changes: the trainer still calls ``reward_fn(images, prompts, prompt_metadata,
only_strict=True)`` in its thread pool, gets ``({"dinalrm": (B,), "avg": (B,)}, {})`` as float32
numpy arrays, trains on ``"avg"`` and logs ``reward_dinalrm``. To mix with Flow-GRPO's own rewards
keep ``multi_score`` and register ``reward_fn.as_scorer()`` in its ``score_functions``.

Forks that keep the final latents skip the decode and the re-encode::

    from dinalrm_align.rewards import flow_grpo_latent_reward
    latent_reward_fn = flow_grpo_latent_reward("liuhuohuo/DiNa-LRM-SD35M-12layers", pipeline, u=0.4)
    rewards, _ = latent_reward_fn(latents[-1], prompt_embeds, pooled_prompt_embeds, prompt_metadata)

Run ``python examples/flow_grpo_plugin.py --tiny`` for a dry run on the tiny models (no trainer
needed): it samples a batch, calls both reward functions exactly as the trainer does and prints
what the trainer would log.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Dry run of the Flow-GRPO reward plug-in")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--model", default="liuhuohuo/DiNa-LRM-SD35M-12layers")
    p.add_argument("--pipeline", default="stabilityai/stable-diffusion-3.5-medium")
    args = p.parse_args(argv)

    from dinalrm_align import LatentRewardModel, encode_prompts
    from dinalrm_align.rewards import flow_grpo_latent_reward, flow_grpo_reward

    if args.tiny:
        from dinalrm_align.testing import tiny_reward_model, tiny_sd3_pipeline

        pipeline = tiny_sd3_pipeline(seed=0)
        model = tiny_reward_model(pipeline.transformer, seed=0)
        device, seq_len, steps, size = "cpu", 16, 4, 64
    else:
        from dinalrm_align.reward_model.pipeline_loading import load_sd3_pipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        pipeline = load_sd3_pipeline(args.pipeline, torch_dtype=dtype, device=device)
        model = LatentRewardModel.from_pretrained(
            args.model, transformer=pipeline.transformer, torch_dtype=dtype, device=device
        )
        seq_len, steps, size = 128, 10, 512

    # --- what the training script builds (a model object here; a hub id / folder works too)
    reward_fn = flow_grpo_reward(model, pipeline, u=0.4, normalization="fork", max_sequence_length=seq_len)
    latent_reward_fn = flow_grpo_latent_reward(
        model, pipeline, u=0.4, normalization="fork", max_sequence_length=seq_len
    )

    # --- one sampling batch, as Flow-GRPO produces it (group of 2 images per prompt)
    prompts = ["a red cube", "a red cube", "a blue ball", "a blue ball"]
    metadata = [{} for _ in prompts]
    prompt_embeds, pooled = encode_prompts(pipeline, prompts, seq_len, device=device)
    with torch.no_grad():
        latents = pipeline(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            num_inference_steps=steps,
            guidance_scale=1.0,
            height=size,
            width=size,
            max_sequence_length=seq_len,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
        ).images
        vae = pipeline.vae
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
        images = (decoded.float() / 2 + 0.5).clamp(
            0, 1
        )  # what pipeline_with_logprob(..., output_type="pt") gives

    # --- exactly the trainer's calls
    with ThreadPoolExecutor(max_workers=1) as executor:
        rewards, reward_metadata = executor.submit(
            reward_fn, images, prompts, metadata, only_strict=True
        ).result()
    rewards = {key: torch.as_tensor(value, device=device).float() for key, value in rewards.items()}
    print(json.dumps({f"reward_{k}": round(float(v.mean()), 6) for k, v in rewards.items()}))

    latent_rewards, _ = latent_reward_fn(latents, prompt_embeds, pooled, metadata)
    print(json.dumps({f"latent_reward_{k}": round(float(v.mean()), 6) for k, v in latent_rewards.items()}))
    print(
        json.dumps({"avg_per_sample": [round(float(x), 6) for x in rewards["avg"]], "keys": sorted(rewards)})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
