"""DiNa-LRM as the reward of trl's DDPOTrainer (trl < 0.24, SD1.x pipelines).

    pip install "dinalrm-align[trl]"          # trl==0.23.1, the last release with DDPOTrainer
    python examples/ddpo_plugin.py --tiny      # one epoch on a tiny offline SD1 pipeline
    python examples/ddpo_plugin.py --sd1 stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --model liuhuohuo/DiNa-LRM-SD35M-12layers --pipeline stabilityai/stable-diffusion-3.5-medium

The only DiNa-LRM line in a DDPO script is the reward function::

    from dinalrm_align.rewards import ddpo_reward_fn
    reward_fn = ddpo_reward_fn("liuhuohuo/DiNa-LRM-SD35M-12layers", sd3_pipeline, u=0.1)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, sd_pipeline)

DDPO hands over SD1 images (B, 3, H, W) in [0, 1]; the adapter VAE-encodes them with the SD3
VAE of ``sd3_pipeline`` and scores the SD3 latents (u = 0.1: clean encoded images). For
AlignProp pass ``differentiable=True`` (gradients flow back through the SD3 VAE encoder).
DDPO samples with classifier-free guidance: keep ``sample_guidance_scale > 1`` (trl 0.23's
pipeline step always concatenates negative and positive prompt embeddings).

Without trl installed the script still runs the adapter with trl's exact call convention.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from typing import Any

import torch

TINY_PROMPTS = ["a red cube", "a blue ball", "a green tree", "a yellow car"]


def tiny_sd1_pipeline(tokenizer: Any, seed: int = 0):
    """A random tiny SD1-style ``StableDiffusionPipeline`` (32x32 images, DDIM, fp32, CPU).

    ``tokenizer``: a CLIP tokenizer (e.g. the tiny SD3 pipeline's, which knows the tiny prompts).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_attention_heads=2,
                num_hidden_layers=2,
                max_position_embeddings=77,
            )
        )
    finally:
        torch.random.set_rng_state(state)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trl_ddpo_available() -> bool:
    try:
        import trl
    except ImportError:
        return False
    return hasattr(trl, "DDPOTrainer")


def run_ddpo(sd1_folder: str, reward_fn: Any, prompts: list[str], *, tiny: bool, project_dir: str) -> Any:
    """One DDPO epoch with ``reward_fn``; returns the trainer."""
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    PartialState()  # trl's pipeline logs through accelerate before the trainer exists
    sd_pipeline = DefaultDDPOStableDiffusionPipeline(sd1_folder, use_lora=True)
    small = dict(sample_num_steps=2, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2)
    full = dict(sample_num_steps=50, sample_batch_size=4, sample_num_batches_per_epoch=2, train_batch_size=2)
    config = DDPOConfig(
        num_epochs=1,
        mixed_precision="no" if tiny or not torch.cuda.is_available() else "fp16",
        log_with=None,
        per_prompt_stat_tracking=False,
        train_gradient_accumulation_steps=1,
        sample_guidance_scale=5.0,
        allow_tf32=False,
        project_kwargs={"project_dir": project_dir},
        **(small if tiny else full),
    )
    rng = random.Random(0)
    trainer = DDPOTrainer(config, reward_fn, lambda: (rng.choice(prompts), {}), sd_pipeline)
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="DiNa-LRM reward in trl's DDPOTrainer")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--sd1", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="the SD1 policy")
    p.add_argument("--model", default="liuhuohuo/DiNa-LRM-SD35M-12layers")
    p.add_argument(
        "--pipeline", default="stabilityai/stable-diffusion-3.5-medium", help="SD3 (reward) pipeline"
    )
    args = p.parse_args(argv)

    from dinalrm_align.rewards import ddpo_reward_fn

    calls: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from dinalrm_align.tiny import tiny_reward_model, tiny_sd3_pipeline

            sd3 = tiny_sd3_pipeline(seed=0)
            reward_fn = ddpo_reward_fn(
                tiny_reward_model(sd3.transformer, seed=0), sd3, u=0.1, max_sequence_length=16
            )
            sd1 = tiny_sd1_pipeline(sd3.tokenizer)
            sd1.save_pretrained(f"{tmp}/sd1")
            sd1_folder, prompts = f"{tmp}/sd1", TINY_PROMPTS
        else:
            dtype = torch.float16 if torch.cuda.is_available() else torch.float32
            device = "cuda" if torch.cuda.is_available() else "cpu"
            reward_fn = ddpo_reward_fn(args.model, args.pipeline, u=0.1, torch_dtype=dtype, device=device)
            sd1 = None
            sd1_folder, prompts = args.sd1, ["a photo of a cat", "a photo of a dog", "a red sports car"]

        def logged_reward_fn(images, prompts_, metadata):
            rewards, info = reward_fn(images, prompts_, metadata)
            calls.append({"images": list(images.shape), "rewards": [round(float(r), 6) for r in rewards]})
            return rewards, info

        if trl_ddpo_available():
            run_ddpo(sd1_folder, logged_reward_fn, prompts, tiny=args.tiny, project_dir=f"{tmp}/ddpo")
            mode = "trl.DDPOTrainer, 1 epoch"
        else:  # trl's call convention without trl: (images in [0, 1], tuple of prompts, tuple of metadata)
            if sd1 is None:
                from diffusers import StableDiffusionPipeline

                sd1 = StableDiffusionPipeline.from_pretrained(sd1_folder)
            with torch.no_grad():
                images = sd1(prompts[:2], num_inference_steps=2, output_type="pt").images
            rewards, _ = logged_reward_fn(images, tuple(prompts[:2]), ({}, {}))
            torch.cat([torch.as_tensor(rewards)])  # what DDPOTrainer does with them
            mode = (
                "trl not installed (pip install 'dinalrm-align[trl]'): adapter called with trl's convention"
            )
    print(json.dumps({"mode": mode, "reward_calls": calls}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
