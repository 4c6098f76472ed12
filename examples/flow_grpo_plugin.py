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
numpy arrays, trains on ``"avg"`` and logs ``reward_dinalrm``. To mix with Flow-GRPO's own rewards use
``dinalrm_align.integrations.flow_grpo.flow_grpo_latent_multi_score`` (docs/integrations.md): Flow-GRPO's
reward table is a local variable of its ``multi_score``, not something to register into.

Forks that keep the final latents skip the decode and the re-encode::

    from dinalrm_align.rewards import flow_grpo_latent_reward
    latent_reward_fn = flow_grpo_latent_reward("liuhuohuo/DiNa-LRM-SD35M-12layers", pipeline, u=0.4)
    rewards, _ = latent_reward_fn(latents[:, -1], prompt_embeds, pooled_prompt_embeds, prompt_metadata)

(``latents`` is the stacked ``(B, T + 1, C, h, w)`` trajectory: ``latents[:, -1]`` are the final latents.)

The same works for FLUX.1 and Z-Image policies with a reward model of that family: pass the FLUX.1 /
Z-Image pipeline (its VAE re-encodes the images, its text stack encodes the prompts). For the latent
variant give what the family's ``encode_prompt`` gives (Z-Image: the list of embeddings and ``None`` as
the pooled embeddings) and *unpacked* latents (FLUX.1 pipelines pack them).

Run ``python examples/flow_grpo_plugin.py --tiny [--backbone flux|zimage]`` for a dry run on the tiny
models (no trainer needed): it samples a batch, calls both reward functions exactly as the trainer
does and prints what the trainer would log.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

#: Guidance of a sample: SD3.5 CFG scale (1 = off), FLUX.1-dev's embedded guidance, Z-Image-Turbo without CFG.
GUIDANCE = {"sd3": 1.0, "flux": 3.5, "zimage": 0.0}


def sample(pipe: Any, adapter: Any, prompt_embeds: Any, pooled: Any, *, steps: int, size: int,
           seq_len: int, backbone: str) -> torch.Tensor:
    """Unpacked normalised latents (B, 16, h, w) from the pipeline's own sampler."""
    kwargs = {"prompt_embeds": prompt_embeds}
    if pooled is not None:  # Z-Image has no pooled text vector
        kwargs["pooled_prompt_embeds"] = pooled
    latents = pipe(
        **kwargs, num_inference_steps=steps, guidance_scale=GUIDANCE[backbone], height=size, width=size,
        max_sequence_length=seq_len, generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
    ).images
    return adapter.unpack_pipeline_latents(pipe, latents, size, size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Dry run of the Flow-GRPO reward plug-in")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--backbone", default="sd3", choices=["sd3", "flux", "zimage"], help="model family")
    p.add_argument("--model", default=None,
                   help="reward model (default: liuhuohuo/DiNa-LRM-SD35M-12layers for sd3; required otherwise)")
    p.add_argument("--pipeline", default=None, help="policy / reward pipeline (default: the family's base model)")
    args = p.parse_args(argv)

    from dinalrm_align import LatentRewardModel, encode_prompts
    from dinalrm_align.backbones.registry import get_adapter
    from dinalrm_align.rewards import flow_grpo_latent_reward, flow_grpo_reward

    adapter = get_adapter(args.backbone)
    if args.tiny:
        from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

        pipeline = tiny_pipeline(args.backbone, seed=0)
        model = tiny_reward_model(args.backbone, pipeline, seed=0)
        device, seq_len, steps, size = "cpu", 16, 4, 64
    else:
        from dinalrm_align.backbones.loading import load_any_pipeline

        model_id = args.model or ("liuhuohuo/DiNa-LRM-SD35M-12layers" if args.backbone == "sd3" else None)
        if model_id is None:
            p.error(f"--model is required for --backbone {args.backbone}")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        pipeline, adapter = load_any_pipeline(args.pipeline or adapter.default_model_id, backbone=args.backbone,
                                              torch_dtype=dtype)
        pipeline.to(device)
        model = LatentRewardModel.from_pretrained(
            model_id, transformer=pipeline.transformer, torch_dtype=dtype, device=device,
            scheduler_config=pipeline.scheduler.config,
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
        latents = sample(pipeline, adapter, prompt_embeds, pooled, steps=steps, size=size, seq_len=seq_len,
                         backbone=args.backbone)
        # what pipeline_with_logprob(..., output_type="pt") gives: images (B, 3, H, W) in [0, 1]
        images = adapter.decode(pipeline, latents)

    # --- exactly the trainer's calls
    with ThreadPoolExecutor(max_workers=1) as executor:
        rewards, reward_metadata = executor.submit(
            reward_fn, images, prompts, metadata, only_strict=True
        ).result()
    rewards = {key: torch.as_tensor(value, device=device).float() for key, value in rewards.items()}
    print(json.dumps({f"reward_{k}": round(float(v.mean()), 6) for k, v in rewards.items()}))

    latent_rewards, _ = latent_reward_fn(latents, prompt_embeds, pooled, metadata)
    print(json.dumps({f"latent_reward_{k}": round(float(v.mean()), 6) for k, v in latent_rewards.items()}))
    print(json.dumps({"avg_per_sample": [round(float(x), 6) for x in rewards["avg"]], "keys": sorted(rewards),
                      "backbone": args.backbone}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
