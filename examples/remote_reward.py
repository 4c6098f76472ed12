"""DiNa-LRM behind an HTTP server: the client, and a remote reward inside a composition.

    # terminal 1 (GPU box):  dinalrm-align serve --model liuhuohuo/DiNa-LRM-SD35M-12layers \
    #                            --pipeline stabilityai/stable-diffusion-3.5-medium --port 8000
    # terminal 2 (trainer):
    python examples/remote_reward.py --url http://127.0.0.1:8000 --pipeline stabilityai/stable-diffusion-3.5-medium
    python examples/remote_reward.py --tiny    # starts a tiny server in this process (loopback, free port)

The remote reward derives per-sample seeds on the client and sends them, and normalises the raw
scores on the client, so it returns what the local reward returns with the same settings. It is
never differentiable (no ``score_differentiable``): use it for GRPO / DDPO / NFT, not ReFL.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Remote DiNa-LRM reward")
    p.add_argument(
        "--tiny", action="store_true", help="serve the tiny models in-process and compare with local"
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--pipeline", default="stabilityai/stable-diffusion-3.5-medium", help="SD3 pipeline (latents, text)"
    )
    args = p.parse_args(argv)

    from dinalrm_align import encode_prompts
    from dinalrm_align.rewards import CompositeReward, DiNaLatentReward, NoiseSeeding, RemoteLatentReward
    from dinalrm_align.serving import RewardClient

    with contextlib.ExitStack() as stack:
        local = None
        if args.tiny:
            from dinalrm_align.serving import BackgroundServer, ScoringEngine, create_app
            from dinalrm_align.testing import tiny_reward_model, tiny_sd3_pipeline

            pipe = tiny_sd3_pipeline(seed=0)
            local = DiNaLatentReward(
                tiny_reward_model(pipe.transformer, seed=0), pipe, max_sequence_length=16
            )
            engine = ScoringEngine(local, model_id="tiny", pipeline_id="tiny")
            url = stack.enter_context(BackgroundServer(create_app(engine), host="127.0.0.1", port=0)).url
            seq_len, size, steps = 16, 64, 4
        else:
            from dinalrm_align.reward_model.pipeline_loading import load_sd3_pipeline

            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            pipe = load_sd3_pipeline(args.pipeline, torch_dtype=dtype, device=device)
            url, seq_len, size, steps = args.url, 128, 512, 28

        # 1) the plain client
        client = stack.enter_context(RewardClient(url))
        info = client.info()
        print(
            json.dumps(
                {"server": {k: info[k] for k in ("model", "dtype", "u", "normalization", "max_batch_size")}}
            )
        )
        prompts = ["a red cube", "a blue ball"]
        prompt_embeds, pooled = encode_prompts(pipe, prompts, seq_len)
        with torch.no_grad():
            latents = pipe(
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
        out = client.score(latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, seed=0)
        print(
            json.dumps(
                {"client.score": {"raw": out.raw.tolist(), "score": out.score.tolist(), "sigma": out.sigma}}
            )
        )

        # 2) the remote reward in a composition (e.g. next to a local one)
        seeding = NoiseSeeding("prompt", base_seed=0)
        remote = RemoteLatentReward(url, u=0.4, seeding=seeding, client=client)
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
