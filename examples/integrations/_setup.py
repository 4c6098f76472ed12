"""Shared set-up of the integration examples: models (tiny or real) and a sampler that keeps its trajectory.

Not an example itself. ``load_models`` gives ``(pipeline, reward_model, adapter, settings)``;
``sample_trajectory`` runs the family's own diffusers pipeline and returns what RL trainers' samplers
hand over: the per-step latents (initial noise first, ``T + 1`` entries, *packed* for FLUX, exactly as the
pipeline holds them) and the decoded images ``(B, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

#: Guidance of a sample: SD3.5 without CFG (1), FLUX.1's embedded guidance, Z-Image-Turbo without CFG.
GUIDANCE = {"sd3": 1.0, "flux": 3.5, "zimage": 0.0}
DEFAULT_MODEL = {"sd3": "liuhuohuo/DiNa-LRM-SD35M-12layers"}


def add_model_args(p: argparse.ArgumentParser, default_backbone: str = "sd3") -> None:
    p.add_argument("--tiny", action="store_true", help="built-in tiny offline models (seconds on a CPU)")
    p.add_argument("--backbone", default=default_backbone, choices=["sd3", "flux", "zimage"], help="model family")
    p.add_argument("--model", default=None, help="reward model id / folder (default for sd3: the released DiNa-LRM)")
    p.add_argument("--pipeline", default=None, help="policy pipeline id / folder (default: the family's base model)")


def load_models(args: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(pipeline, reward_model, adapter, settings)``; settings: device, seq_len, steps, size."""
    from dinalrm_align.backbones.registry import get_adapter

    adapter = get_adapter(args.backbone)
    if args.tiny:
        from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

        pipeline = tiny_pipeline(args.backbone, seed=0)
        model = tiny_reward_model(args.backbone, pipeline, seed=0)
        return pipeline, model, adapter, {"device": "cpu", "seq_len": 16, "steps": 3, "size": 64}
    from dinalrm_align import LatentRewardModel
    from dinalrm_align.backbones.loading import load_any_pipeline

    model_id = args.model or DEFAULT_MODEL.get(args.backbone)
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
    return pipeline, model, adapter, {"device": device, "seq_len": 128, "steps": 10, "size": 512}


@torch.no_grad()
def sample_trajectory(pipeline: Any, adapter: Any, prompts: list[str], *, backbone: str, steps: int, size: int,
                      seq_len: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(images (B, 3, size, size) in [0, 1], trajectory)``; trajectory: ``T + 1`` latents, each ``(B, 16, h, w)``
    (SD3.5, Z-Image) or packed ``(B, N, 64)`` (FLUX), the initial noise first and the final latents last."""
    from dinalrm_align.backbones.flux import pack_latents

    channels, h, w = adapter.latent_shape(pipeline, size, size)
    device = pipeline.transformer.device
    noise = torch.randn(len(prompts), channels, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    start = pack_latents(noise) if backbone == "flux" else noise
    trajectory = [start]

    def keep(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        trajectory.append(kwargs["latents"].clone())
        return kwargs

    out = pipeline(
        prompt=list(prompts), num_inference_steps=steps, guidance_scale=GUIDANCE[backbone], height=size,
        width=size, max_sequence_length=seq_len, latents=start.to(pipeline.transformer.dtype),
        output_type="latent", callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"],
    ).images
    assert torch.equal(out, trajectory[-1])
    images = adapter.decode(pipeline, adapter.unpack_pipeline_latents(pipeline, out, size, size))
    return images, trajectory
