"""Reward plug-ins on the FLUX.1 and Z-Image backbones (tiny offline models): the local reward with prompts or
the family's embeddings, declared fields, composition, the Flow-GRPO / DDPO adapters and the pixel bridge
(images re-encoded with the family's own VAE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinalrm_align.backbones.flux import pack_latents
from dinalrm_align.backbones.registry import get_adapter
from dinalrm_align.reward_model.text import encode_prompts
from dinalrm_align.rewards import (
    CompositeReward,
    DiNaLatentReward,
    ddpo_reward_fn,
    flow_grpo_latent_reward,
    flow_grpo_reward,
    images_to_latents,
)
from dinalrm_align.rewards.dinalrm import key_embeddings
from dinalrm_align.rewards.seeding import batch_seeds, noise_from_seeds
from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

SEQ = 16
#: Captions of different lengths (Z-Image's embeddings are then ragged and travel padded + masked).
PROMPTS = ["a red cube", "a big blue ball on a green tree", "a red cube", "a yellow car"]
FAMILIES = ["flux", "zimage"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(name, pipeline, reward model, text = encode_prompts(pipeline, PROMPTS, SEQ))."""
    name = request.param
    pipe = tiny_pipeline(name, seed=0)
    rm = tiny_reward_model(name, pipe, seed=0)
    return name, pipe, rm, encode_prompts(pipe, PROMPTS, SEQ)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(4, 16, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _direct(rm, latents, pe, pooled, seeds, u=0.4):
    """The model itself with the noise of ``seeds`` (raw, no normalisation)."""
    with torch.no_grad():
        return rm.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=u,
                        noise=noise_from_seeds(seeds, latents.shape[1:]))


# ---------------------------------------------------------------------- the local reward
def test_text_encoding_matches_the_pipeline_and_the_model(family, latents):
    name, pipe, rm, (pe, pooled) = family
    if name == "zimage":
        assert isinstance(pe, list) and pooled is None
        assert len({t.shape[0] for t in pe}) > 1  # ragged: the batch is padded and masked inside
    else:
        assert pe.shape == (4, SEQ, 32) and pooled.shape == (4, 32)
    reward = DiNaLatentReward(rm, pipe, max_sequence_length=SEQ)
    by_prompts = reward.score_raw(latents=latents, prompts=PROMPTS)
    by_embeds = reward.score_raw(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, prompts=PROMPTS)
    assert torch.allclose(by_prompts, by_embeds, atol=1e-6)
    seeds = reward.seeds_for(4, PROMPTS, None, None)
    assert seeds[0] == seeds[2] != seeds[1]  # prompt-keyed noise
    assert torch.allclose(by_prompts, _direct(rm, latents, pe, pooled, seeds), atol=1e-5)
    # a sample's score does not depend on its batch neighbours (Z-Image: on their padding)
    alone = [reward.score_raw(latents=latents[i : i + 1], prompts=PROMPTS[i : i + 1]) for i in range(4)]
    assert torch.allclose(torch.cat(alone), by_prompts, atol=1e-5)
    assert reward.describe()["backbone"] == name


def test_embeddings_only_reward_declares_the_family_fields(family, latents):
    name, pipe, rm, (pe, pooled) = family
    with_text = DiNaLatentReward(rm, pipe)
    no_text = DiNaLatentReward(rm)
    if name == "zimage":
        assert with_text.required_fields == ("latents", "text_unpooled")
        assert "pooled_prompt_embeds" not in with_text.optional_fields
        assert no_text.required_fields == ("latents", "prompt_embeds")
    else:
        assert with_text.required_fields == ("latents", "text")
        assert no_text.required_fields == ("latents", "prompt_embeds", "pooled_prompt_embeds")
    raw = no_text.score_raw(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled)
    cond = rm.conditioning(pe, pooled)
    seeds = batch_seeds(no_text.seeding, batch_size=4, prompts=None, pooled_prompt_embeds=key_embeddings(cond),
                        metadata=None)
    assert seeds[0] == seeds[2] and len(set(seeds)) == 3  # keyed by the embeddings of the same prompt
    assert torch.allclose(raw, _direct(rm, latents, pe, pooled, seeds), atol=1e-5)
    with pytest.raises(ValueError, match="prompt_embeds"):
        no_text(latents=latents, prompts=PROMPTS)


def test_composite_takes_the_family_embeddings(family, latents):
    name, pipe, rm, (pe, pooled) = family
    reward = DiNaLatentReward(rm, pipe, max_sequence_length=SEQ)
    comp = CompositeReward({"dinalrm": (reward, 1.0)})
    out = comp(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled)
    assert torch.allclose(out["avg"], reward(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled))
    if name == "zimage":  # no pooled vector: the token embeddings alone are the text
        assert comp.required_fields == ("latents", "text_unpooled")
    else:  # one embedding is not enough
        with pytest.raises(ValueError, match="needs \\['text'\\]"):
            comp(latents=latents, prompt_embeds=pe)
    with pytest.raises(ValueError, match="needs"):
        comp(latents=latents)


def test_differentiable_scores_reach_latents(family, latents):
    _, pipe, rm, _ = family
    reward = DiNaLatentReward(rm, pipe, max_sequence_length=SEQ)
    lat = latents[:2].clone().requires_grad_(True)
    scores = reward.score_differentiable(latents=lat, prompts=PROMPTS[:2])
    scores.sum().backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0
    assert torch.allclose(scores.detach(), reward(latents=latents[:2], prompts=PROMPTS[:2]), atol=1e-6)


def test_clear_errors_for_wrong_family_inputs(family, latents):
    name, pipe, rm, (pe, pooled) = family
    reward = DiNaLatentReward(rm, pipe, max_sequence_length=SEQ)
    if name == "zimage":
        with pytest.raises(ValueError, match="no pooled"):
            reward(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=torch.zeros(4, 32))
    else:
        with pytest.raises(ValueError, match="pooled"):
            reward(latents=latents, prompt_embeds=pe)
        # FluxPipeline(output_type="latent") gives packed (B, N, 64) latents: the error says to unpack them
        with pytest.raises(ValueError, match="unpack"):
            reward(latents=pack_latents(latents), prompts=PROMPTS)
    other = tiny_pipeline("sd3")
    with pytest.raises(ValueError, match=f"{name} model but the pipeline is a StableDiffusion3Pipeline"):
        DiNaLatentReward(rm, other)


def test_from_pretrained_by_tiny_id_equals_the_tiny_model(family, latents):
    name, pipe, rm, _ = family
    loaded = DiNaLatentReward.from_pretrained(f"tiny-{name}", f"tiny-{name}", max_sequence_length=SEQ)
    assert loaded.model.adapter.name == name and type(loaded.pipeline) is type(pipe)
    local = DiNaLatentReward(rm, pipe, max_sequence_length=SEQ)
    assert torch.allclose(loaded(latents=latents, prompts=PROMPTS), local(latents=latents, prompts=PROMPTS), atol=1e-6)


# ---------------------------------------------------------------------- pixel bridge and adapters
def test_pixel_bridge_uses_the_family_vae(family, images):
    name, pipe, _, _ = family
    latents = images_to_latents(images, pipe)
    assert latents.shape == (4, 16, 32, 32)
    with torch.no_grad():
        expected = get_adapter(name).encode_pixels(pipe.vae, images * 2 - 1, sample=False)
    assert torch.allclose(latents, expected, atol=1e-5)
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    assert (shift, scale) == (0.1159, 0.3611)  # FLUX AE constants (Z-Image uses the same AE)
    assert torch.equal(images_to_latents(images, pipe), latents)  # posterior mean: deterministic


def test_flow_grpo_image_adapter(family, images):
    _, pipe, rm, _ = family
    fn = flow_grpo_reward(rm, pipe, max_sequence_length=SEQ)
    details, info = fn(images, PROMPTS, [{} for _ in PROMPTS], only_strict=True)
    assert info == {} and set(details) == {"dinalrm", "avg"}
    for value in details.values():
        assert isinstance(value, np.ndarray) and value.dtype == np.float32 and value.shape == (4,)
    local = DiNaLatentReward(rm, pipe, max_sequence_length=SEQ)
    expected = local(latents=images_to_latents(images, pipe), prompts=PROMPTS)
    assert np.allclose(details["avg"], expected.numpy(), atol=1e-6)
    other_images = fn(images.flip(0), PROMPTS, None)[0]["avg"]
    assert not np.allclose(other_images, details["avg"])  # the scores read the images


def test_flow_grpo_latent_adapter(family, latents):
    name, pipe, rm, (pe, pooled) = family
    fn = flow_grpo_latent_reward(rm, normalization="fork")
    if name == "zimage":
        details, info = fn(latents, pe, None, [{}] * 4)  # the trainer's embeddings: a list, no pooled
    else:
        details, info = fn(latents, pe, pooled, [{}] * 4)
    assert info == {} and details["avg"].dtype == np.float32 and details["avg"].shape == (4,)
    same = DiNaLatentReward(rm, normalization="fork")(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled)
    assert np.allclose(details["avg"], same.numpy(), atol=1e-6)
    keyed, _ = fn(latents, pe, pooled, prompts=PROMPTS)  # prompts key the seeds like the local reward
    local = DiNaLatentReward(rm, pipe, max_sequence_length=SEQ, normalization="fork")
    assert np.allclose(keyed["avg"], local(latents=latents, prompts=PROMPTS).numpy(), atol=1e-6)


def test_ddpo_adapter_encodes_sd1_images_with_the_family_vae(family):
    _, pipe, rm, _ = family
    fn = ddpo_reward_fn(rm, pipe, u=0.1, max_sequence_length=SEQ)
    sd1 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    rewards, info = fn(sd1, ("a red cube", "a yellow car"), ({}, {}))
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and set(info) == {"dinalrm", "avg"}
    local = DiNaLatentReward(rm, pipe, u=0.1, max_sequence_length=SEQ)
    expected = local(latents=images_to_latents(sd1, pipe), prompts=["a red cube", "a yellow car"])
    assert torch.allclose(rewards, expected, atol=1e-6)
