"""DiNa-LRM behind an HTTP server: the client, and a remote reward inside a composition.

    # terminal 1 (GPU box):  dinalrm-align serve --model liuhuohuo/DiNa-LRM-SD35M-12layers \
    #                            --pipeline stabilityai/stable-diffusion-3.5-medium --port 8000
    # terminal 2 (trainer):
    python examples/remote_reward.py --url http://127.0.0.1:8000 --pipeline stabilityai/stable-diffusion-3.5-medium
    python examples/remote_reward.py --tiny    # starts a tiny server in this process (loopback, free port)
    python examples/remote_reward.py --tiny --backbone zimage   # tiny Z-Image-style server (also: flux)

The remote reward derives per-sample seeds on the client and sends them, and normalises the raw
scores on the client, so it returns what the local reward returns with the same settings. It is
never differentiable (no ``score_differentiable``): use it for GRPO / DDPO / NFT, not ReFL.
Embeddings travel as the server's family needs them: SD3.5 / FLUX.1 with the pooled vector, Z-Image's
variable-length captions padded with a ``prompt_embeds_mask`` (the client does that).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

import torch

#: Guidance of a sample: SD3.5 CFG scale (1 = off), FLUX.1-dev's embedded guidance, Z-Image-Turbo without CFG.
GUIDANCE = {"sd3": 1.0, "flux": 3.5, "zimage": 0.0}


def sample(pipe: Any, adapter: Any, prompt_embeds: Any, pooled: Any, *, steps: int, size: int, seq_len: int,
           backbone: str) -> torch.Tensor:
    """Unpacked normalised latents (B, 16, h, w) from the pipeline's own sampler."""
    kwargs = {"prompt_embeds": prompt_embeds}
    if pooled is not None:  # Z-Image has no pooled text vector
        kwargs["pooled_prompt_embeds"] = pooled
    with torch.no_grad():
        latents = pipe(
            **kwargs, num_inference_steps=steps, guidance_scale=GUIDANCE[backbone], height=size, width=size,
            max_sequence_length=seq_len, generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
        ).images
    return adapter.unpack_pipeline_latents(pipe, latents, size, size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Remote DiNa-LRM reward")
    p.add_argument(
        "--tiny", action="store_true", help="serve the tiny models in-process and compare with local"
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--backbone", default="sd3", choices=["sd3", "flux", "zimage"],
                   help="the server's model family (the policy pipeline must be of it)")
    p.add_argument("--pipeline", default=None, help="policy pipeline (latents, text; default: the family's base model)")
    args = p.parse_args(argv)

    from dinalrm_align import encode_prompts
    from dinalrm_align.backbones.registry import get_adapter
    from dinalrm_align.rewards import CompositeReward, DiNaLatentReward, NoiseSeeding, RemoteLatentReward
    from dinalrm_align.serving import RewardClient

    adapter = get_adapter(args.backbone)
    with contextlib.ExitStack() as stack:
        local = None
        if args.tiny:
            from dinalrm_align.serving import BackgroundServer, ScoringEngine, create_app
            from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

            pipe = tiny_pipeline(args.backbone, seed=0)
            local = DiNaLatentReward(tiny_reward_model(args.backbone, pipe, seed=0), pipe, max_sequence_length=16)
            tiny_id = "tiny" if args.backbone == "sd3" else f"tiny-{args.backbone}"
            engine = ScoringEngine(local, model_id=tiny_id, pipeline_id=tiny_id)
            url = stack.enter_context(BackgroundServer(create_app(engine), host="127.0.0.1", port=0)).url
            seq_len, size, steps = 16, 64, 4
        else:
            from dinalrm_align.backbones.loading import load_any_pipeline

            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            pipe, adapter = load_any_pipeline(args.pipeline or adapter.default_model_id, backbone=args.backbone,
                                              torch_dtype=dtype)
            pipe.to(device)
            url, seq_len, size, steps = args.url, 128, 512, 28

        # 1) the plain client
        client = stack.enter_context(RewardClient(url))
        info = client.info()
        print(
            json.dumps(
                {"server": {k: info[k] for k in ("model", "backbone", "dtype", "u", "normalization", "max_batch_size")}}
            )
        )
        prompts = ["a red cube", "a blue ball"]
        if info["backbone"] != args.backbone:
            print(f"error: the server scores {info['backbone']} latents; run with --backbone {info['backbone']}",
                  file=sys.stderr)
            return 2
        prompt_embeds, pooled = encode_prompts(pipe, prompts, seq_len)  # Z-Image: a list of tensors and None
        latents = sample(pipe, adapter, prompt_embeds, pooled, steps=steps, size=size, seq_len=seq_len,
                         backbone=args.backbone)
        out = client.score(latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, seed=0)
        print(
            json.dumps(
                {"client.score": {"raw": out.raw.tolist(), "score": out.score.tolist(), "sigma": out.sigma}}
            )
        )

        # 2) the remote reward in a composition (e.g. next to a local one)
        seeding = NoiseSeeding("prompt", base_seed=0)
        remote = RemoteLatentReward(url, u=0.4, seeding=seeding, client=client,
                                    pooled_text=info["pooled_width"] is not None)
        components = {"remote": (remote, 1.0)}
        if local is not None:
            components["local"] = (
                DiNaLatentReward(local.model, pipe, max_sequence_length=seq_len, seeding=seeding),
                0.0,
            )
        composite = CompositeReward(components)
        details = composite(
            latents=latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, prompts=prompts
        )
        print(json.dumps({k: [round(x, 6) for x in v.tolist()] for k, v in details.items()}))
        if local is not None:
            same = torch.allclose(details["remote"], details["local"], atol=1e-5)
            print(json.dumps({"remote_equals_local": same}))
            if not same:
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
