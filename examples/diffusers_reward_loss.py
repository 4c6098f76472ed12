"""DiNa-LRM as an extra loss term in a diffusers flow-matching LoRA script (train_dreambooth_lora_sd3.py style).

One training step of those scripts, rebuilt in a few lines: VAE-normalised latents of the training images,
a logit-normal noise level per sample, ``z_t = (1 - sigma) x0 + sigma noise``, the transformer's velocity
``v``, the flow-matching loss against ``noise - x0`` -- plus the reward of the one-step estimate
``x0_hat = z_t - sigma v``:

    loss = fm_loss - reward_weight * reward(x0_hat).mean()

The reward's gradient reaches the LoRA through ``v`` (no VAE decode). It prints one JSON line per step.

    python examples/diffusers_reward_loss.py --tiny [--backbone sd3|flux|zimage] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "integrations"))
from _setup import add_model_args, load_models  # noqa: E402


def training_images(n: int, size: int) -> torch.Tensor:
    """Stand-in for the instance images: (n, 3, size, size) in [-1, 1], a coloured square on grey."""
    images = torch.full((n, 3, size, size), -0.2)
    colours = torch.tensor([[0.9, -0.8, -0.8], [-0.8, -0.8, 0.9], [-0.8, 0.9, -0.8], [0.9, 0.9, -0.8]])
    for i in range(n):
        images[i, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = colours[i % 4].view(3, 1, 1)
    return images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--steps", type=int, default=2, help="optimisation steps")
    p.add_argument("--reward-weight", type=float, default=0.5, help="lambda of the reward term")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)

    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig

    from dinalrm_align.integrations import reward_regularised_loss
    from dinalrm_align.reward_model.text import encode_conditioning
    from dinalrm_align.rewards import DiNaLatentReward

    pipeline, model, adapter, s = load_models(args, p)
    device, size = s["device"], s["size"]
    torch.manual_seed(0)

    # --- the script's set-up: frozen pipeline, LoRA on the transformer (add_adapter), AdamW on the LoRA
    transformer = pipeline.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=list(adapter.policy_lora_targets)))
    lora = [q for q in transformer.parameters() if q.requires_grad]
    # guidance-distilled FLUX.1-dev takes its guidance value as an input (None for SD3.5 / Z-Image / schnell)
    guidance = adapter.default_embedded_guidance if adapter.guidance_embedded(transformer) else None
    optimizer = torch.optim.AdamW(lora, lr=args.lr)
    reward = DiNaLatentReward(model, pipeline, u=0.4, max_sequence_length=s["seq_len"])

    prompts = ["a red square", "a blue square"]
    cond = encode_conditioning(pipeline, prompts, s["seq_len"])  # the policy's text conditioning
    with torch.no_grad():  # x0: VAE latents of the training images, (z - shift) * scale
        x0 = adapter.encode_pixels(pipeline.vae, training_images(len(prompts), size).to(device), sample=False)

    for step in range(args.steps):
        noise = torch.randn_like(x0)
        u = compute_density_for_timestep_sampling("logit_normal", batch_size=len(prompts), logit_mean=0.0,
                                                  logit_std=1.0)
        sigmas = u.to(device).float().clamp(0.02, 0.98)  # per-sample noise levels
        noisy = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
        model_pred = adapter.velocity(transformer, noisy, sigmas, cond, guidance=guidance)  # v, (B, C, h, w)
        parts = reward_regularised_loss(
            reward, noisy=noisy, model_pred=model_pred, target=noise - x0, sigmas=sigmas,
            reward_weight=args.reward_weight, prompts=prompts,
        )
        optimizer.zero_grad()
        parts.loss.backward()
        grad_norm = torch.sqrt(sum((q.grad.float() ** 2).sum() for q in lora if q.grad is not None))
        optimizer.step()
        print(json.dumps({
            "backbone": args.backbone, "step": step, "loss": round(parts.loss.item(), 6),
            "fm_loss": round(parts.fm_loss.item(), 6), "reward": [round(r, 6) for r in parts.reward.tolist()],
            "sigmas": [round(float(x), 4) for x in sigmas], "lora_grad_norm": round(float(grad_norm), 8),
        }))
    return 0 if bool(torch.isfinite(parts.loss)) and float(grad_norm) > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
