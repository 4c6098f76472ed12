"""The backbone-neutral ODE sampler equals each diffusers pipeline's own sampling loop.

For SD3.5, FLUX.1 (with and without the embedded guidance of FLUX.1-dev) and Z-Image, a no-grad
``ode_rollout`` through the backbone adapter (its schedule, time convention, packing and output sign)
from the same starting noise must give the pipeline's ``output_type="latent"`` result (unpacked) to
float32 round-off. The CFG conventions differ: SD3 uses ``v_u + g (v_c - v_u)`` like our
:class:`Denoiser`; Z-Image's pipeline writes ``v_c + g (v_c - v_u)``, i.e. our scale ``g + 1``.
"""

from __future__ import annotations

import pytest
import torch

from dinalrm_align.backbones.flux import pack_latents
from dinalrm_align.backbones.registry import get_adapter
from dinalrm_align.sampling.rollout import Denoiser, ode_rollout
from dinalrm_align.tiny import tiny_pipeline

PROMPTS = ["a red cube", "a painting of a blue bird"]
SIDE = 64  # pixels; 32 x 32 latents
STEPS = 4
MAX_LEN = 16


def _noise(channels: int = 16) -> torch.Tensor:
    return torch.randn(len(PROMPTS), channels, SIDE // 2, SIDE // 2, generator=torch.Generator().manual_seed(3))


def _ours(pipe, backbone: str, noise: torch.Tensor, *, guidance_scale: float = 1.0,
          guidance: float | None = None) -> torch.Tensor:
    adapter = get_adapter(backbone)
    cond = adapter.conditioning(*adapter.encode_prompt(pipe, PROMPTS, MAX_LEN))
    negative = adapter.conditioning(*adapter.encode_prompt(pipe, [""], MAX_LEN)) if guidance_scale > 1 else None
    sigmas, _ = adapter.inference_schedule(pipe.scheduler.config, STEPS, tuple(noise.shape[-2:]))
    denoiser = Denoiser(adapter, pipe.transformer, guidance_scale=guidance_scale, negative=negative, guidance=guidance)
    with torch.no_grad():
        return ode_rollout(denoiser, noise.clone(), sigmas, cond)


def _pipeline(pipe, backbone: str, latents: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(prompt=list(PROMPTS), height=SIDE, width=SIDE, num_inference_steps=STEPS, latents=latents,
                   max_sequence_length=MAX_LEN, output_type="latent", **kwargs).images
    return get_adapter(backbone).unpack_pipeline_latents(pipe, out, SIDE, SIDE)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_sd3_ode_rollout_equals_pipeline(guidance_scale: float) -> None:
    pipe = tiny_pipeline("sd3")
    noise = _noise()
    ref = _pipeline(pipe, "sd3", noise.clone(), guidance_scale=guidance_scale, negative_prompt="")
    ours = _ours(pipe, "sd3", noise, guidance_scale=guidance_scale)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_ode_rollout_equals_pipeline(guidance_embeds: bool) -> None:
    """FLUX: packed 2x2 patches, resolution-dependent shift ``mu``, timestep ``sigma`` (the pipeline's
    ``t / 1000``) and, for FLUX.1-dev-like models, the guidance value as an input instead of CFG."""
    pipe = tiny_pipeline("flux", guidance_embeds=guidance_embeds)
    adapter = get_adapter("flux")
    assert adapter.guidance_embedded(pipe.transformer) is guidance_embeds
    noise = _noise()
    ref = _pipeline(pipe, "flux", pack_latents(noise.clone()), guidance_scale=3.5)
    ours = _ours(pipe, "flux", noise, guidance=3.5 if guidance_embeds else None)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    # the schedule really is shifted by resolution: a 4x larger latent gets larger sigmas mid-way
    small, _ = adapter.inference_schedule(pipe.scheduler.config, STEPS, (32, 32))
    large, _ = adapter.inference_schedule(pipe.scheduler.config, STEPS, (128, 128))
    assert (large[1:-1] > small[1:-1]).all()
    if guidance_embeds:  # the embedded guidance changes the prediction
        other = _ours(pipe, "flux", noise, guidance=1.0)
        assert not torch.allclose(other, ours, atol=1e-4)


@pytest.mark.parametrize("pipeline_scale", [0.0, 4.0])
def test_zimage_ode_rollout_equals_pipeline(pipeline_scale: float) -> None:
    """Z-Image: the model sees ``1 - sigma`` and predicts ``x0 - noise`` (negated), text of varying length
    per prompt; its pipeline's CFG scale ``g`` is our ``g + 1`` (``g = 0``: no CFG, like Z-Image-Turbo)."""
    pipe = tiny_pipeline("zimage")
    noise = _noise()
    ref = _pipeline(pipe, "zimage", noise.clone(), guidance_scale=pipeline_scale, negative_prompt=[""] * len(PROMPTS))
    ours = _ours(pipe, "zimage", noise, guidance_scale=pipeline_scale + 1.0 if pipeline_scale > 0 else 1.0)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_rollout_differs_between_steps_counts_and_prompts() -> None:
    """Guard against a vacuous comparison: the latents depend on the prompt and on the schedule."""
    pipe = tiny_pipeline("zimage")
    noise = _noise()
    a = _ours(pipe, "zimage", noise)
    assert not torch.allclose(a[0], a[1], atol=1e-3)
    adapter = get_adapter("zimage")
    cond = adapter.conditioning(*adapter.encode_prompt(pipe, PROMPTS, MAX_LEN))
    sigmas, _ = adapter.inference_schedule(pipe.scheduler.config, 2, (32, 32))
    with torch.no_grad():
        b = ode_rollout(Denoiser(adapter, pipe.transformer), noise.clone(), sigmas, cond)
    assert not torch.allclose(a, b, atol=1e-3)
