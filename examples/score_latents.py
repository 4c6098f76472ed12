"""Score SD3 latents straight from the pipeline with DiNa-LRM (no VAE decode).

    python examples/score_latents.py --tiny
    python examples/score_latents.py --model liuhuohuo/DiNa-LRM-SD35M-12layers \
        --pipeline stabilityai/stable-diffusion-3.5-medium --prompt "a red fox in the snow" --prompt "a blue car"

Prints one JSON line per image: the normalised score ((raw + 10) / 10), the raw reward and the
per-sample noise seed (scores are reproducible: run it twice).
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="built-in tiny models (offline, seconds on CPU)")
    p.add_argument("--model", default="liuhuohuo/DiNa-LRM-SD35M-12layers")
    p.add_argument("--pipeline", default="stabilityai/stable-diffusion-3.5-medium")
    p.add_argument("--prompt", action="append", help="repeat for several prompts")
    p.add_argument("--u", type=float, default=0.4, help="noise level sigma (0.4 for generated latents)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from dinalrm_align import LatentRewardModel, encode_prompts
    from dinalrm_align.rewards import DiNaLatentReward

    prompts = args.prompt or ["a red cube", "a blue ball"]
    if args.tiny:
        from dinalrm_align.testing import tiny_reward_model, tiny_sd3_pipeline

        pipe = tiny_sd3_pipeline(seed=0)
        rm = tiny_reward_model(pipe.transformer, seed=0)
        seq_len, steps, size, guidance = 16, 4, 64, 1.0
    else:
        from dinalrm_align.reward_model.pipeline_loading import load_sd3_pipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        pipe = load_sd3_pipeline(args.pipeline, torch_dtype=dtype, device=device)
        rm = LatentRewardModel.from_pretrained(
            args.model, transformer=pipe.transformer, torch_dtype=dtype, device=device
        )
        seq_len, steps, size, guidance = 128, args.steps, 512, 4.5

    reward = DiNaLatentReward(rm, pipe, u=args.u, max_sequence_length=seq_len)
    prompt_embeds, pooled = encode_prompts(pipe, prompts, seq_len)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    with torch.no_grad():
        latents = pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            max_sequence_length=seq_len,
            generator=generator,
            output_type="latent",  # SD3-normalised latents (B, 16, H/8, W/8): what the reward reads
        ).images
    scores = reward(
        latents=latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, prompts=prompts
    )
    raw = reward.score_raw(
        latents=latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, prompts=prompts
    )
    seeds = reward.seeds_for(len(prompts), prompts, pooled, None)
    for i, prompt in enumerate(prompts):
        print(
            json.dumps(
                {
                    "prompt": prompt,
                    "score": round(float(scores[i]), 6),
                    "raw": round(float(raw[i]), 6),
                    "seed": seeds[i],
                }
            )
        )
    print(json.dumps({"settings": reward.describe()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
