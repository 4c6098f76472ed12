"""Score latents straight from the pipeline with DiNa-LRM (no VAE decode), on SD3.5, FLUX.1 or Z-Image.

    python examples/score_latents.py --tiny                       # tiny SD3.5-style models, offline
    python examples/score_latents.py --tiny --backbone flux       # tiny FLUX.1-style (also: zimage)
    python examples/score_latents.py --model liuhuohuo/DiNa-LRM-SD35M-12layers \
        --pipeline stabilityai/stable-diffusion-3.5-medium --prompt "a red fox in the snow" --prompt "a blue car"

Prints one JSON line per image: the normalised score ((raw + 10) / 10), the raw reward and the
per-sample noise seed (scores are reproducible: run it twice), then the reward's settings.
The reward reads *unpacked* normalised latents (B, 16, h, w): FLUX.1 pipelines return packed latents
with ``output_type="latent"``, which the backbone adapter unpacks.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

#: Released DiNa-LRM reward model per backbone (None: pass --model).
DEFAULT_MODELS = {"sd3": "liuhuohuo/DiNa-LRM-SD35M-12layers", "flux": None, "zimage": None}
#: Guidance of a sample: SD3.5 CFG scale, FLUX.1-dev's embedded guidance, Z-Image-Turbo without CFG.
GUIDANCE = {"sd3": 4.5, "flux": 3.5, "zimage": 0.0}


def sample_latents(pipe: Any, adapter: Any, prompt_embeds: Any, pooled: Any, *, steps: int, size: int,
                   guidance: float, seq_len: int, seed: int) -> torch.Tensor:
    """The pipeline's own sampler -> unpacked normalised latents (B, 16, size/8, size/8) (tiny: size/2)."""
    kwargs = {"prompt_embeds": prompt_embeds}
    if pooled is not None:  # SD3.5 and FLUX.1 have a pooled text vector, Z-Image has none
        kwargs["pooled_prompt_embeds"] = pooled
    with torch.no_grad():
        latents = pipe(
            **kwargs, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
            max_sequence_length=seq_len, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
        ).images
    return adapter.unpack_pipeline_latents(pipe, latents, size, size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="built-in tiny models (offline, seconds on CPU)")
    p.add_argument("--backbone", default="sd3", choices=["sd3", "flux", "zimage"], help="model family")
    p.add_argument("--model", default=None, help="reward model (default: the released SD3.5-M one for sd3)")
    p.add_argument("--pipeline", default=None, help="pipeline (default: the reward model's family default)")
    p.add_argument("--prompt", action="append", help="repeat for several prompts")
    p.add_argument("--u", type=float, default=0.4, help="noise level sigma (0.4 for generated latents)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from dinalrm_align import LatentRewardModel, encode_prompts
    from dinalrm_align.backbones.registry import get_adapter
    from dinalrm_align.rewards import DiNaLatentReward

    prompts = args.prompt or ["a red cube", "a blue ball"]
    adapter = get_adapter(args.backbone)
    if args.tiny:
        from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

        pipe = tiny_pipeline(args.backbone, seed=0)
        rm = tiny_reward_model(args.backbone, pipe, seed=0)
        seq_len, steps, size = 16, 4, 64
        guidance = 1.0 if args.backbone == "sd3" else GUIDANCE[args.backbone]  # tiny SD3: no CFG
    else:
        from dinalrm_align.backbones.loading import load_any_pipeline

        model = args.model or DEFAULT_MODELS[args.backbone]
        if model is None:
            p.error(f"--model is required for --backbone {args.backbone} (a reward model folder or hub id)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        pipe, adapter = load_any_pipeline(args.pipeline or adapter.default_model_id, backbone=args.backbone,
                                          torch_dtype=dtype)
        pipe.to(device)
        rm = LatentRewardModel.from_pretrained(model, transformer=pipe.transformer, torch_dtype=dtype, device=device,
                                               scheduler_config=pipe.scheduler.config)
        seq_len, steps, size, guidance = 128, args.steps, 512, GUIDANCE[args.backbone]

    reward = DiNaLatentReward(rm, pipe, u=args.u, max_sequence_length=seq_len)
    prompt_embeds, pooled = encode_prompts(pipe, prompts, seq_len)  # Z-Image: a list of tensors and None
    latents = sample_latents(pipe, adapter, prompt_embeds, pooled, steps=steps, size=size, guidance=guidance,
                             seq_len=seq_len, seed=args.seed)
    scores = reward(latents=latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, prompts=prompts)
    raw = reward.score_raw(latents=latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, prompts=prompts)
    seeds = reward.seeds_for(len(prompts), prompts, None, None)
    for i, prompt in enumerate(prompts):
        print(json.dumps({"prompt": prompt, "score": round(float(scores[i]), 6), "raw": round(float(raw[i]), 6),
                          "seed": seeds[i]}))
    print(json.dumps({"settings": reward.describe()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
