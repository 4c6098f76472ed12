"""Features parity: with the reward LoRA at zero, ``rm.features`` equals what the same blocks of the
pipeline's own, unmodified (not truncated) diffusers transformer compute, called with the pipeline's own
time convention.

The reference side is written from the pipelines' facts only (inputs built as each pipeline builds them,
block outputs captured with our own forward hooks), never with the package's adapters.
"""

from __future__ import annotations

import math

import pytest
import torch

from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

PROMPTS = ["a red cube", "a small blue ball on a wooden table next to a green tree"]
SIGMA = torch.tensor([0.25, 0.625])  # exact in float32: no rounding hides a wrong time convention
ATOL = 1e-5
#: Taps including 0 (the first block's input) and the last kept block.
TAPS = {"sd3": [0, 2, 4], "flux": [0, 2, 4], "zimage": [0, 1, 3]}


def _reward_model(backbone, pipe):
    taps = TAPS[backbone]
    rm = tiny_reward_model(
        backbone, pipe, randomize_zero_init=False, visual_head_idx=taps, text_head_idx=taps
    )
    lora_b = [p for n, p in rm.backbone.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b), "the reward LoRA must start at zero"
    assert any(torch.count_nonzero(p) > 0 for n, p in rm.backbone.named_parameters() if "lora_A" in n)
    return rm


class Capture:
    """Forward hooks on ``blocks``: ``inputs`` (kwargs of block 0) and ``outputs[i]`` (1-based), ``temb``."""

    def __init__(self, blocks, temb_module, taps):
        self.outputs, self.temb, self.inputs = {}, None, None
        self.handles = [blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True)]
        for tap in taps:
            if tap > 0:
                self.handles.append(blocks[tap - 1].register_forward_hook(self._post(tap)))
        self.handles.append(temb_module.register_forward_hook(self._temb))

    def _pre(self, module, args, kwargs):
        self.inputs = (args, dict(kwargs))

    def _post(self, tap):
        def hook(module, args, output):
            self.outputs[tap] = output

        return hook

    def _temb(self, module, args, output):
        self.temb = output

    def remove(self):
        for h in self.handles:
            h.remove()


def _noisy(x0, noise):
    s = SIGMA[:, None, None, None]
    return (1 - s) * x0 + s * noise


def _latents(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 16, 16, 16, generator=g)


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def _check_dual_stream(feats, cap, taps):
    assert len(feats.image) == len(taps) and len(feats.text) == len(taps)
    for k, tap in enumerate(taps):
        if tap == 0:
            args, kwargs = cap.inputs
            image, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        else:
            text, image = cap.outputs[tap]  # diffusers' dual-stream blocks return (text, image)
        _close(feats.image[k], image, f"image tokens of tap {tap}")
        _close(feats.text[k], text, f"text tokens of tap {tap}")
    assert feats.text_mask is None


@torch.no_grad()
def test_sd3_features_equal_the_unmodified_transformer():
    pipe = tiny_pipeline("sd3", seed=3)
    rm = _reward_model("sd3", pipe)
    pe, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, None, None, max_sequence_length=8, do_classifier_free_guidance=False
    )
    x0, noise = _latents(0)
    transformer = pipe.transformer
    assert len(transformer.transformer_blocks) == 6  # the full model, not a truncated copy
    cap = Capture(transformer.transformer_blocks, transformer.time_text_embed, TAPS["sd3"])
    try:  # StableDiffusion3Pipeline: timestep = 1000 * sigma
        transformer(
            hidden_states=_noisy(x0, noise),
            timestep=1000 * SIGMA,
            encoder_hidden_states=pe,
            pooled_projections=pooled,
            return_dict=False,
        )
    finally:
        cap.remove()
    feats = rm.features(x0, pe, pooled, sigma=SIGMA, noise=noise)
    _check_dual_stream(feats, cap, TAPS["sd3"])
    _close(feats.temb, cap.temb, "temb")
    assert feats.image[0].shape == (2, 64, 32) and feats.text[0].shape == (2, 77 + 8, 32)


@torch.no_grad()
def test_flux_features_equal_the_unmodified_transformer():
    pipe = tiny_pipeline("flux", seed=3)
    transformer = pipe.transformer
    assert transformer.config.guidance_embeds  # FLUX.1-dev-like: the guidance value is an input
    rm = _reward_model("flux", pipe)
    pe, pooled, text_ids = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=8)
    x0, noise = _latents(1)
    b, c, h, w = x0.shape
    # FluxPipeline: packed latents, image ids of the (h/2, w/2) grid, timestep t / 1000 = sigma, guidance 3.5
    packed = pipe._pack_latents(_noisy(x0, noise), b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)
    guidance = torch.full([1], 3.5, dtype=torch.float32).expand(b)
    assert len(transformer.single_transformer_blocks) == 2  # the full model, not a truncated copy
    cap = Capture(transformer.transformer_blocks, transformer.time_text_embed, TAPS["flux"])
    try:
        transformer(
            hidden_states=packed,
            timestep=SIGMA,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=pe,
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )
    finally:
        cap.remove()
    feats = rm.features(x0, pe, pooled, sigma=SIGMA, noise=noise)
    _check_dual_stream(feats, cap, TAPS["flux"])
    _close(feats.temb, cap.temb, "temb")
    assert feats.image[0].shape == (2, 64, 32) and feats.text[0].shape == (2, 8, 32)
    # the guidance input matters: without it (another temb) the features would differ
    cap2 = Capture(transformer.transformer_blocks, transformer.time_text_embed, [])
    try:
        transformer(
            hidden_states=packed,
            timestep=SIGMA,
            guidance=guidance * 0 + 1.0,
            pooled_projections=pooled,
            encoder_hidden_states=pe,
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )
    finally:
        cap2.remove()
    assert not torch.allclose(cap2.temb, feats.temb, atol=ATOL)


@torch.no_grad()
def test_zimage_features_equal_the_unmodified_transformer():
    pipe = tiny_pipeline("zimage", seed=3)
    transformer = pipe.transformer
    rm = _reward_model("zimage", pipe)
    caps, _ = pipe.encode_prompt(
        prompt=list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=64
    )
    lengths = [t.shape[0] for t in caps]
    assert lengths[0] < lengths[1]  # captions of different lengths: padding and masks are exercised
    x0, noise = _latents(2)
    assert len(transformer.layers) == 4  # the full model, not a truncated copy
    cap = Capture(transformer.layers, transformer.t_embedder, TAPS["zimage"])
    # ZImagePipeline: x = list of (C, 1, h, w), t = (1000 - 1000 sigma) / 1000 = 1 - sigma, cap_feats = list
    try:
        transformer(list(_noisy(x0, noise).unsqueeze(2).unbind(0)), 1 - SIGMA, caps, return_dict=False)
    finally:
        cap.remove()
    feats = rm.features(x0, caps, None, sigma=SIGMA, noise=noise)
    # the unified sequence of the main layers is, per sample, [image tokens padded to a multiple of 32;
    # caption tokens padded to a multiple of 32], batch-padded to the longest
    n_img = (16 // 2) * (16 // 2)
    x_len = math.ceil(n_img / 32) * 32
    taps = TAPS["zimage"]
    assert len(feats.image) == len(taps) and len(feats.text) == len(taps)
    assert feats.text_mask is not None
    assert feats.text_mask.tolist() == [[j < n for j in range(max(lengths))] for n in lengths]
    for k, tap in enumerate(taps):
        unified = cap.inputs[0][0] if tap == 0 else cap.outputs[tap]
        _close(feats.image[k], unified[:, :n_img], f"image tokens of tap {tap}")
        for i, n in enumerate(lengths):
            _close(
                feats.text[k][i, :n],
                unified[i, x_len : x_len + n],
                f"caption tokens of sample {i}, tap {tap}",
            )
    _close(feats.temb, cap.temb, "temb")


@pytest.mark.parametrize("backbone", ["sd3", "flux", "zimage"])
@torch.no_grad()
def test_a_nonzero_reward_lora_changes_the_features(backbone):
    """The parity above is not vacuous: the same comparison fails once the LoRA is not zero."""
    pipe = tiny_pipeline(backbone, seed=3)
    rm = _reward_model(backbone, pipe)
    pe, pooled = rm.adapter.encode_prompt(pipe, PROMPTS, 8)
    x0, noise = _latents(3)
    before = rm.features(x0, pe, pooled, sigma=SIGMA, noise=noise)
    for n, p in rm.backbone.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    after = rm.features(x0, pe, pooled, sigma=SIGMA, noise=noise)
    assert not torch.allclose(before.image[-1], after.image[-1], atol=ATOL)
    torch.testing.assert_close(before.temb, after.temb)  # the LoRA is on the blocks, not the time embedding
