"""Huge finite inputs and non-finite model outputs give a clear ValueError instead of a silent NaN."""

from __future__ import annotations

import pytest
import torch

from dinalrm_align.reward_model import validation
from dinalrm_align.reward_model.validation import MAX_INPUT_MAGNITUDE
from dinalrm_align.tiny import tiny_reward_model

LATENT_KW = dict(in_channels=16, patch_size=2, max_side=192)
TEXT_KW = dict(batch_size=2, joint_attention_dim=32, pooled_projection_dim=64)


def _latents(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 16, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_latent_magnitude_bound():
    x = _latents()
    validation.check_latents(x, **LATENT_KW)
    edge = x.clone()
    edge[1, 3, 4, 5] = -MAX_INPUT_MAGNITUDE  # the bound itself is accepted
    validation.check_latents(edge, **LATENT_KW)
    for bad in (1e30, -2 * MAX_INPUT_MAGNITUDE):
        y = x.clone()
        y[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"latents holds values up to .* at most 10000"):
            validation.check_latents(y, **LATENT_KW)


def test_text_embedding_magnitude_bound():
    pe, pooled = torch.randn(2, 20, 32), torch.randn(2, 64)
    validation.check_text_conditions(pe, pooled, **TEXT_KW)
    huge = pe.clone()
    huge[1, 2, 3] = -3e20
    with pytest.raises(ValueError, match=r"prompt_embeds holds values up to 3e\+20"):
        validation.check_text_conditions(huge, pooled, **TEXT_KW)
    with pytest.raises(ValueError, match="pooled_prompt_embeds holds values"):
        validation.check_text_conditions(pe, pooled + 5e4, **TEXT_KW)
    with pytest.raises(ValueError, match="noise holds values"):
        validation.check_noise(_latents() * 1e6, (2, 16, 32, 32))


def test_magnitude_check_skips_meta_tensors():
    validation.check_latents(torch.empty(2, 16, 32, 32, device="meta"), **LATENT_KW)
    validation.check_scores(torch.empty(2, device="meta"))


def test_huge_latents_raise_instead_of_returning_nan(tiny_rm, tiny_text):
    """The reported fault: latents of 1e30 gave NaN scores silently (float32 layer norms overflow)."""
    _, pe, pooled = tiny_text
    kw = dict(prompt_embeds=pe[:2], pooled_prompt_embeds=pooled[:2], generator=torch.Generator().manual_seed(0))
    ok = tiny_rm.score(_latents() * 100, **kw)
    assert bool(torch.isfinite(ok).all())
    for scale in (1e20, 1e30):
        with pytest.raises(ValueError, match="latents holds values up to"):
            tiny_rm.score(_latents() * scale, **kw)
        with pytest.raises(ValueError, match="latents holds values up to"):
            tiny_rm.score_ensemble(_latents() * scale, prompt_embeds=pe[:2], pooled_prompt_embeds=pooled[:2])
    with pytest.raises(ValueError, match="prompt_embeds holds values"):
        tiny_rm.score(_latents(), prompt_embeds=pe[:2] * 1e30, pooled_prompt_embeds=pooled[:2])


def test_check_scores_names_rows_and_cause():
    ok = torch.tensor([0.1, -2.0, 3.0])
    assert validation.check_scores(ok) is ok
    bad = torch.tensor([0.1, float("nan"), 3.0, float("inf")])
    with pytest.raises(ValueError, match=r"2 of 4 row\(s\) \[1, 3\].*float16") as info:
        validation.check_scores(bad, model_dtype=torch.float16)
    assert "weights in torch.float16" in str(info.value)
    multi = torch.zeros(3, 2)
    multi[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 3 row\(s\) \[2\]"):
        validation.check_scores(multi)


def test_check_scores_catches_nan_from_a_broken_model(tiny_pipe, tiny_text):
    """Finite, in-range inputs; NaN weights (as a diverged run leaves them) -> the output check fires."""
    _, pe, pooled = tiny_text
    rm = tiny_reward_model(tiny_pipe.transformer, seed=1)
    with torch.no_grad():
        rm.reward_head.head.weight[0, 0] = float("nan")
    lat, noise = _latents(4, 3), _latents(4, 4)
    with pytest.raises(ValueError, match=r"4 of 4 row\(s\) \[0, 1, 2, 3\].*NaN/Inf weights"):
        rm.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    with pytest.raises(ValueError, match=r"4 of 4 row\(s\).*NaN/Inf weights"):
        rm.score_ensemble(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    # the unchecked hot path returns the NaNs; check_scores names them
    raw = rm.score_conditioning(lat, rm.conditioning(pe, pooled), noise=noise, check=False)
    assert bool(torch.isnan(raw).all())
    with pytest.raises(ValueError, match=r"4 of 4 row\(s\) \[0, 1, 2, 3\].*NaN/Inf weights"):
        validation.check_scores(raw, model_dtype=rm.dtype)
