"""Trainer integrations: Flow-GRPO, DiffusionNFT, DanceGRPO and the diffusers reward loss, called with each
trainer's own calling convention (rebuilt here from their public interfaces) on the tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
import torch

from dinalrm_align.backbones.flux import pack_latents
from dinalrm_align.integrations import (
    dance_grpo_latent_reward_fn,
    diffusion_nft_latent_reward_fn,
    final_latents,
    flow_grpo_latent_multi_score,
    flow_grpo_latent_reward_fn,
    predicted_x0,
    reward_regularised_loss,
)
from dinalrm_align.rewards import DiNaLatentReward

ROOT = Path(__file__).resolve().parents[1]
SEQ = 16
SIZE = 64  # image pixels; tiny VAEs have factor 2 -> 32x32 latents
PROMPTS = ["a red cube", "a red cube", "a blue ball", "a yellow car"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def family(tiny_pipe, tiny_rm):
    """backbone -> (pipeline, reward model); sd3 reuses the session's tiny models."""
    from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

    out = {"sd3": (tiny_pipe, tiny_rm)}
    for name in ("flux", "zimage"):
        pipe = tiny_pipeline(name, seed=0)
        out[name] = (pipe, tiny_reward_model(name, pipe, seed=0))
    return out


def trajectory(backbone: str, batch: int = 4, steps: int = 3, seed: int = 0) -> torch.Tensor:
    """A stacked sampler trajectory (B, T+1, 16, 32, 32), or (B, T+1, 256, 64) packed for FLUX."""
    g = torch.Generator().manual_seed(seed)
    steps_ = [torch.randn(batch, 16, 32, 32, generator=g) for _ in range(steps + 1)]
    if backbone == "flux":
        steps_ = [pack_latents(x) for x in steps_]
    return torch.stack(steps_, dim=1)


def unpacked(backbone: str, latents: torch.Tensor) -> torch.Tensor:
    from dinalrm_align.backbones.flux import unpack_latents

    return unpack_latents(latents, 32, 32) if backbone == "flux" else latents


def direct(family, backbone: str, **kwargs) -> DiNaLatentReward:
    pipe, rm = family[backbone]
    return DiNaLatentReward(rm, pipe, max_sequence_length=SEQ, **kwargs)


# ---------------------------------------------------------------------------------------------- Flow-GRPO
@pytest.mark.parametrize("backbone", ["sd3", "flux", "zimage"])
def test_flow_grpo_reward_fn_in_the_trainer_convention(family, backbone):
    pipe, rm = family[backbone]
    reward_fn = flow_grpo_latent_reward_fn(rm, pipe, normalization="fork", max_sequence_length=SEQ,
                                           height=SIZE, width=SIZE)
    latents = trajectory(backbone)
    metadata = [{} for _ in PROMPTS]
    with futures.ThreadPoolExecutor(max_workers=2) as executor:  # the trainer's reward thread pool
        rewards, info = executor.submit(reward_fn, latents[:, -1], PROMPTS, metadata, only_strict=True).result()
    assert info == {} and set(rewards) == {"dinalrm", "avg"}
    for value in rewards.values():
        assert isinstance(value, np.ndarray) and value.dtype == np.float32 and value.shape == (4,)
        assert np.isfinite(value).all()
    as_tensors = {k: torch.as_tensor(v).float() for k, v in rewards.items()}  # what the trainer does
    expected = direct(family, backbone, normalization="fork")(latents=unpacked(backbone, latents[:, -1]),
                                                             prompts=PROMPTS)
    torch.testing.assert_close(as_tensors["dinalrm"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(as_tensors["avg"], expected, rtol=0, atol=1e-6)
    assert len(set(rewards["avg"].tolist())) == 4  # different latents, different scores


def test_flow_grpo_latent_mistakes_are_clear_value_errors(family):
    pipe, rm = family["sd3"]
    reward_fn = flow_grpo_latent_reward_fn(rm, pipe, max_sequence_length=SEQ)
    latents = trajectory("sd3", batch=4, steps=2)  # (4, 3, 16, 32, 32)
    with pytest.raises(ValueError, match=r"trajectory.*latents\[:, -1\]"):
        reward_fn(latents, PROMPTS, None)
    with pytest.raises(ValueError, match=r"latents\[:, -1\]"):  # latents[-1]: one sample's 3 steps
        reward_fn(latents[-1], PROMPTS, None)
    with pytest.raises(ValueError, match=r"list of 3 latents.*trajectory\[-1\]"):
        reward_fn(list(latents.unbind(1)), PROMPTS, None)
    with pytest.raises(ValueError, match="got 4 latents but 3 prompts"):
        reward_fn(latents[:, -1], PROMPTS[:3], None)
    with pytest.raises(ValueError, match="4 samples but 2 metadata"):
        reward_fn(latents[:, -1], PROMPTS, [{}, {}])
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        reward_fn(torch.randn(4, 4, 32, 32), PROMPTS, None)
    with pytest.raises(ValueError, match="no packed latent layout"):
        reward_fn(torch.randn(4, 256, 64), PROMPTS, None)
    with pytest.raises(ValueError, match="torch.Tensor"):
        reward_fn(np.zeros((4, 16, 32, 32), np.float32), PROMPTS, None)
    with pytest.raises(ValueError, match="NaN"):
        reward_fn(torch.full((4, 16, 32, 32), float("nan")), PROMPTS, None)


def test_flux_packed_latents_need_the_image_size_and_trajectories_are_caught(family):
    pipe, rm = family["flux"]
    reward_fn = flow_grpo_latent_reward_fn(rm, pipe, max_sequence_length=SEQ)  # no height / width
    latents = trajectory("flux")  # (4, 4, 256, 64)
    with pytest.raises(ValueError, match="height= and width="):
        reward_fn(latents[:, -1], PROMPTS, None)
    with pytest.raises(ValueError, match=r"packed FLUX trajectory"):
        reward_fn(latents, PROMPTS, None)
    with pytest.raises(ValueError, match="do not fit"):  # the wrong size for 256 tokens
        flow_grpo_latent_reward_fn(rm, pipe, max_sequence_length=SEQ, height=128, width=64)(
            latents[:, -1], PROMPTS, None)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        flow_grpo_latent_reward_fn(rm, pipe, height=-64, width=64)


def test_reward_thread_and_trainer_thread_encode_prompts_concurrently(family):
    """Flow-GRPO encodes the next batch's prompts with the pipeline's tokenizers while the reward of the last
    batch runs in its thread pool: both must get correctly padded text every time."""
    import threading

    pipe, rm = family["sd3"]
    reward_fn = flow_grpo_latent_reward_fn(rm, pipe, max_sequence_length=SEQ, prompt_cache_size=0)
    assert reward_fn.scoring.pipeline.tokenizer is not pipe.tokenizer
    assert reward_fn.scoring.pipeline.text_encoder is pipe.text_encoder  # models are shared, not copied
    latents = trajectory("sd3", batch=2)[:, -1]
    errors, lengths = [], set()

    def reward_thread() -> None:
        for i in range(40):
            try:
                reward_fn(latents, [f"a red cube {i}", "a blue ball"], None)
            except Exception as exc:  # collected and reported below
                errors.append(exc)

    worker = threading.Thread(target=reward_thread)
    worker.start()
    while worker.is_alive():
        try:
            pe, *_ = pipe.encode_prompt(prompt=["a green tree", "a yellow car in a red tree"], prompt_2=None,
                                        prompt_3=None, max_sequence_length=SEQ, do_classifier_free_guidance=False)
            lengths.add(pe.shape[1])
        except Exception as exc:
            errors.append(exc)
    worker.join()
    assert not errors, errors[:3]
    assert lengths == {77 + SEQ}


def test_flow_grpo_multi_score_mixes_latent_and_image_rewards(family):
    pipe, rm = family["sd3"]

    def image_multi_score(device, score_dict):  # Flow-GRPO's multi_score convention, rebuilt
        def _fn(images, prompts, metadata, only_strict=True):
            details = {"brightness": images.mean(dim=(1, 2, 3)).numpy(), "brightness_accuracy": [1.0] * len(prompts)}
            details["avg"] = sum(w * details[n] for n, w in score_dict.items())
            return details, {"calls": 1}
        return _fn

    dina = flow_grpo_latent_reward_fn(rm, pipe, max_sequence_length=SEQ)
    mixed = flow_grpo_latent_multi_score({"dinalrm": 1.0, "brightness": 0.25}, {"dinalrm": dina},
                                         image_reward_fn=image_multi_score("cpu", {"brightness": 1.0}))
    latents = trajectory("sd3")[:, -1]
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    details, info = mixed(latents, PROMPTS, [{}] * 4, only_strict=True, images=images)
    assert info == {"calls": 1} and details["brightness_accuracy"] == [1.0] * 4
    alone, _ = dina(latents, PROMPTS, None)
    np.testing.assert_allclose(details["dinalrm"], alone["dinalrm"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(details["avg"], alone["dinalrm"] + 0.25 * images.mean(dim=(1, 2, 3)).numpy(),
                               rtol=1e-6)
    assert details["avg"].dtype == np.float32
    scores, extra = dina.as_scorer()(latents, PROMPTS, None, only_strict=False)  # per-reward convention
    np.testing.assert_allclose(scores, alone["dinalrm"], rtol=0, atol=1e-6)
    assert extra == {} and scores.shape == (4,)
    with pytest.raises(ValueError, match="pass images="):
        mixed(latents, PROMPTS, None)
    with pytest.raises(ValueError, match="pass image_reward_fn"):
        flow_grpo_latent_multi_score({"dinalrm": 1.0, "pickscore": 0.2}, {"dinalrm": dina})
    with pytest.raises(ValueError, match="no weight"):
        flow_grpo_latent_multi_score({"pickscore": 1.0}, {"dinalrm": dina}, image_reward_fn=lambda *a, **k: None)
    with pytest.raises(ValueError, match="returned no"):
        flow_grpo_latent_multi_score({"dinalrm": 1.0, "clip": 0.1}, {"dinalrm": dina},
                                     image_reward_fn=image_multi_score("cpu", {"brightness": 1.0}))(
            latents, PROMPTS, None, images=images)


def test_flow_grpo_differentiable_route_and_seeding_per_epoch(family):
    pipe, rm = family["sd3"]
    reward_fn = flow_grpo_latent_reward_fn(rm, pipe, max_sequence_length=SEQ)
    latents = trajectory("sd3")[:, -1].clone().requires_grad_(True)
    scores = reward_fn.differentiable(latents, PROMPTS)
    assert scores.shape == (4,) and scores.requires_grad
    scores.sum().backward()
    assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0
    plain, _ = reward_fn(latents.detach(), PROMPTS, None)
    np.testing.assert_allclose(scores.detach().numpy(), plain["avg"], rtol=0, atol=1e-6)
    reward_fn.set_step(1)
    epoch1, _ = reward_fn(latents.detach(), PROMPTS, None)
    assert not np.allclose(epoch1["avg"], plain["avg"])  # new reward noise in a new epoch ...
    reward_fn.set_step(0)
    again, _ = reward_fn(latents.detach(), PROMPTS, None)
    np.testing.assert_array_equal(again["avg"], plain["avg"])  # ... and reproducible


def test_reward_and_pipeline_loaded_by_id():
    reward_fn = flow_grpo_latent_reward_fn("tiny-flux", "tiny-flux", max_sequence_length=SEQ, height=SIZE,
                                           width=SIZE, torch_dtype=torch.float32, device="cpu")
    assert reward_fn.scoring.adapter.name == "flux" and reward_fn.scoring.channels == 16
    rewards, _ = reward_fn(trajectory("flux")[:, -1], PROMPTS, None)
    assert rewards["avg"].shape == (4,) and np.isfinite(rewards["avg"]).all()
    with pytest.raises(ValueError, match="cannot make a reward from object"):
        flow_grpo_latent_reward_fn(object())


# ---------------------------------------------------------------------------------------------- DiffusionNFT
@pytest.mark.parametrize("backbone", ["sd3", "zimage"])
def test_diffusion_nft_scores_the_stored_clean_latents(family, backbone):
    pipe, rm = family[backbone]
    reward_fn = diffusion_nft_latent_reward_fn(rm, pipe, max_sequence_length=SEQ)
    latents = trajectory(backbone)
    sample = {"latents_clean": latents[:, -1]}  # what the NFT script stores for training
    with futures.ThreadPoolExecutor(max_workers=1) as executor:
        rewards, _ = executor.submit(reward_fn, latents[:, -1], PROMPTS, [{}] * 4, only_strict=True).result()
    expected = direct(family, backbone)(latents=sample["latents_clean"], prompts=PROMPTS)
    torch.testing.assert_close(torch.as_tensor(rewards["avg"]), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- DanceGRPO
def test_dance_grpo_chunked_flux_loop_matches_direct_scores(family):
    pipe, rm = family["flux"]
    reward_fn = dance_grpo_latent_reward_fn(rm, pipe, max_sequence_length=SEQ)
    final = trajectory("flux")[:, -1]  # (4, 256, 64) packed
    all_rewards = []
    for i in range(4):  # DanceGRPO's FLUX script: chunks of one sample, (b,) rewards appended
        chunk = reward_fn(final[i:i + 1], PROMPTS[i:i + 1], height=SIZE, width=SIZE)
        assert chunk.shape == (1,) and chunk.dtype == torch.float32 and not chunk.requires_grad
        all_rewards.append(chunk)
    rewards = torch.cat(all_rewards, dim=0).to(torch.float32)
    expected = direct(family, "flux")(latents=unpacked("flux", final), prompts=PROMPTS)
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6)
    single = reward_fn(final[:1], PROMPTS[0], height=SIZE, width=SIZE)  # one caption as a string
    torch.testing.assert_close(single, expected[:1], rtol=0, atol=1e-6)


def test_dance_grpo_trainer_embeddings_and_gradients(family):
    pipe, rm = family["sd3"]
    from dinalrm_align import encode_prompts

    pe, pooled = encode_prompts(pipe, PROMPTS, max_sequence_length=SEQ)
    reward_fn = dance_grpo_latent_reward_fn(rm, pipe, max_sequence_length=SEQ)
    final = trajectory("sd3")[:, -1]
    with_embeds = reward_fn(final, PROMPTS, encoder_hidden_states=pe, pooled_prompt_embeds=pooled)
    expected = direct(family, "sd3")(latents=final, prompt_embeds=pe, pooled_prompt_embeds=pooled, prompts=PROMPTS)
    torch.testing.assert_close(with_embeds, expected, rtol=0, atol=1e-6)
    x = final.clone().requires_grad_(True)
    reward_fn.differentiable(x, PROMPTS).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"list of 4 latents.*\[-1\]"):  # the SD3.5 sampler's list of steps
        reward_fn(list(trajectory("sd3").unbind(1)), PROMPTS)
    with pytest.raises(ValueError, match="got 4 latents but 2 prompts"):
        reward_fn(final, PROMPTS[:2])
    with pytest.raises(ValueError, match="without encoder_hidden_states"):
        reward_fn(final, PROMPTS, pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match="got 4 latents but 2 prompt embeddings"):
        reward_fn(final, None, encoder_hidden_states=pe[:2], pooled_prompt_embeds=pooled[:2])


# ---------------------------------------------------------------------------------------------- diffusers loss
def test_reward_regularised_loss_matches_its_definition_and_reaches_the_prediction(family):
    pipe, rm = family["sd3"]
    reward = direct(family, "sd3")
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 16, 32, 32, generator=g), torch.randn(4, 16, 32, 32, generator=g)
    sigmas = torch.tensor([0.1, 0.3, 0.6, 0.9]).view(4, 1, 1, 1)  # the scripts' (B, 1, 1, 1)
    noisy = (1 - sigmas) * x0 + sigmas * noise
    pred = (noise - x0 + 0.1 * torch.randn(4, 16, 32, 32, generator=g)).requires_grad_(True)
    parts = reward_regularised_loss(reward, noisy=noisy, model_pred=pred, target=noise - x0, sigmas=sigmas,
                                    reward_weight=0.5, prompts=PROMPTS)
    x0_hat = noisy - sigmas * pred
    torch.testing.assert_close(parts.x0_hat, x0_hat)
    fm = ((pred - (noise - x0)) ** 2).mean()
    scores = reward.score_differentiable(latents=x0_hat, prompts=PROMPTS)
    torch.testing.assert_close(parts.fm_loss, fm)
    torch.testing.assert_close(parts.reward, scores)
    torch.testing.assert_close(parts.loss, fm - 0.5 * scores.mean())
    (grad_total,) = torch.autograd.grad(parts.loss, pred)
    (grad_fm,) = torch.autograd.grad(fm, pred)
    assert torch.isfinite(grad_total).all() and (grad_total - grad_fm).abs().sum() > 0  # the reward's share
    low = reward_regularised_loss(reward, noisy=noisy, model_pred=pred, target=noise - x0, sigmas=sigmas,
                                  reward_weight=0.5, prompts=PROMPTS, max_sigma=0.5)
    assert low.scored.tolist() == [0, 1]
    torch.testing.assert_close(low.reward, reward.score_differentiable(latents=x0_hat[:2], prompts=PROMPTS[:2]))
    from dinalrm_align import encode_prompts

    pe, pooled = encode_prompts(pipe, PROMPTS, max_sequence_length=SEQ)  # the same text, given as embeddings
    embedded = reward_regularised_loss(reward, noisy=noisy, model_pred=pred, target=noise - x0, sigmas=sigmas,
                                       reward_weight=0.5, prompts=PROMPTS, prompt_embeds=pe,
                                       pooled_prompt_embeds=pooled, max_sigma=0.5)
    torch.testing.assert_close(embedded.reward, low.reward)
    off = reward_regularised_loss(reward, noisy=noisy, model_pred=pred, target=noise - x0, sigmas=sigmas,
                                  reward_weight=0.0, prompts=PROMPTS)
    assert off.scored.numel() == 0 and torch.equal(off.loss, off.fm_loss)
    torch.testing.assert_close(predicted_x0(noisy, pred, sigmas, precondition_outputs=True), pred)


def test_reward_regularised_loss_bad_input(family):
    reward = direct(family, "sd3")
    z = torch.zeros(2, 16, 32, 32)
    ok = dict(noisy=z, model_pred=z, target=z, sigmas=0.3, reward_weight=1.0, prompts=PROMPTS[:2])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        reward_regularised_loss(reward, **{**ok, "sigmas": torch.tensor([300.0, 500.0])})
    with pytest.raises(ValueError, match=r"sigmas must be a scalar, \(2,\)"):
        reward_regularised_loss(reward, **{**ok, "sigmas": torch.tensor([0.1, 0.2, 0.3])})
    with pytest.raises(ValueError, match="unpack the prediction"):
        reward_regularised_loss(reward, **{**ok, "model_pred": torch.zeros(2, 256, 64)})
    with pytest.raises(ValueError, match="reward_weight"):
        reward_regularised_loss(reward, **{**ok, "reward_weight": -1.0})
    with pytest.raises(ValueError, match="got 2 latents but 3 prompts"):
        reward_regularised_loss(reward, **{**ok, "prompts": PROMPTS[:3]})
    with pytest.raises(ValueError, match="not a differentiable latent reward"):
        reward_regularised_loss(object(), **ok)


def test_final_latents_unpacks_only_what_the_family_packs(family):
    from dinalrm_align.backbones.registry import get_adapter

    pipe, _ = family["flux"]
    x = torch.randn(2, 16, 32, 32)
    out = final_latents(pack_latents(x), adapter=get_adapter("flux"), pipeline=pipe, channels=16, height=SIZE,
                        width=SIZE)
    assert torch.equal(out, x)
    assert final_latents(x, adapter=get_adapter("sd3"), channels=16) is x
    with pytest.raises(ValueError, match="needs the reward's pipeline"):
        final_latents(pack_latents(x), adapter=get_adapter("flux"), channels=16, height=SIZE, width=SIZE)


# ---------------------------------------------------------------------------------------------- examples
# each script is a fresh interpreter (imports + tiny models): ~12-16 s wall on the shared 2-core machine, so all
# but the Flow-GRPO one are marked slow
EXAMPLES = [
    pytest.param("integrations/flow_grpo_latent.py", ["--backbone", "flux"], "matches_direct_reward", id="flow_grpo"),
    pytest.param("integrations/diffusion_nft.py", [], "advantages", id="diffusion_nft", marks=pytest.mark.slow),
    pytest.param("integrations/dance_grpo.py", [], "advantages", id="dance_grpo", marks=pytest.mark.slow),
    pytest.param("diffusers_reward_loss.py", ["--backbone", "zimage"], "lora_grad_norm", id="diffusers",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("script", "extra", "key"), EXAMPLES)
def test_example_scripts_run_as_subprocesses(script, extra, key):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--tiny", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    hits = [r for r in records if key in r]
    assert hits, proc.stdout
    if key == "matches_direct_reward":
        assert hits[-1][key] is True
    if key == "lora_grad_norm":
        assert all(r[key] > 0 and np.isfinite(r["loss"]) for r in hits)
    if key == "advantages":
        assert all(np.isfinite(r["advantages"]).all() for r in hits)
