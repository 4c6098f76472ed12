"""trl's real DDPOTrainer (trl==0.23.1, the ``trl`` extra) for one epoch with the DiNa-LRM adapter.

Skipped when trl is missing or too new (DDPOTrainer was removed in trl 0.24).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
if not hasattr(trl, "DDPOTrainer"):
    pytest.skip(
        f"trl {trl.__version__} has no DDPOTrainer (removed in 0.24); install trl==0.23.1",
        allow_module_level=True,
    )

from dinalrm_align.rewards import ddpo_reward_fn, images_to_latents  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddpo_plugin.py"


def _example_module():
    spec = importlib.util.spec_from_file_location("ddpo_plugin_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ddpo_trainer_one_epoch_with_dinalrm_reward(tiny_pipe, tiny_rm, tmp_path):
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    example = _example_module()
    example.tiny_sd1_pipeline(tiny_pipe.tokenizer).save_pretrained(tmp_path / "sd1")
    reward_fn = ddpo_reward_fn(tiny_rm, tiny_pipe, u=0.1, max_sequence_length=16)
    calls = []

    def recording_reward_fn(images, prompts, prompt_metadata):
        out = reward_fn(images, prompts, prompt_metadata)
        calls.append((images.detach().clone(), prompts, prompt_metadata, out))
        return out

    PartialState()
    sd_pipeline = DefaultDDPOStableDiffusionPipeline(str(tmp_path / "sd1"), use_lora=True)
    config = DDPOConfig(
        num_epochs=1,
        sample_num_steps=2,
        sample_batch_size=2,
        sample_num_batches_per_epoch=2,
        train_batch_size=2,
        train_gradient_accumulation_steps=1,
        sample_guidance_scale=5.0,  # trl 0.23's sampling step requires CFG
        mixed_precision="no",
        log_with=None,
        per_prompt_stat_tracking=False,
        allow_tf32=False,
        project_kwargs={"project_dir": str(tmp_path / "run")},
    )
    prompts = iter(["a red cube", "a blue ball", "a green tree", "a yellow car"])
    trainer = DDPOTrainer(
        config, recording_reward_fn, lambda: (next(prompts), {"source": "test"}), sd_pipeline
    )
    lora_before = {n: p.detach().clone() for n, p in sd_pipeline.unet.named_parameters() if p.requires_grad}
    assert lora_before, "trl should have added a trainable LoRA"
    trainer.train()

    assert len(calls) == 2  # one reward call per sampling batch
    for images, prompts_, metadata, (rewards, info) in calls:
        assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1  # SD1 pixels
        assert isinstance(prompts_, tuple) and metadata == ({"source": "test"}, {"source": "test"})
        assert rewards.shape == (2,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
        assert set(info) == {"dinalrm", "avg"}
        # the SD1 images were scored through the SD3 VAE of the reward's pipeline
        direct = reward_fn.reward(latents=images_to_latents(images, tiny_pipe), prompts=list(prompts_))["avg"]
        assert torch.allclose(rewards, direct, atol=1e-6)
    changed = [
        n
        for n, p in sd_pipeline.unet.named_parameters()
        if p.requires_grad and not torch.equal(p, lora_before[n])
    ]
    assert changed, "one DDPO epoch on DiNa-LRM rewards should update the policy LoRA"


def test_ddpo_trainer_async_reward_computation(tiny_pipe, tiny_rm, tmp_path):
    """``DDPOConfig(async_reward_computation=True)``: trl calls the reward in its thread pool and then calls
    ``.result()`` on both returned values; ``ddpo_reward_fn(..., async_results=True)`` returns those futures."""
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    example = _example_module()
    example.tiny_sd1_pipeline(tiny_pipe.tokenizer).save_pretrained(tmp_path / "sd1")
    reward_fn = ddpo_reward_fn(tiny_rm, tiny_pipe, u=0.1, max_sequence_length=16, async_results=True)
    threads, calls = set(), []

    def recording_reward_fn(images, prompts, prompt_metadata):
        import threading

        threads.add(threading.current_thread().name)
        rewards, info = reward_fn(images, prompts, prompt_metadata)
        calls.append((images.detach().clone(), list(prompts), rewards.result(), info.result()))
        return rewards, info

    PartialState()
    sd_pipeline = DefaultDDPOStableDiffusionPipeline(str(tmp_path / "sd1"), use_lora=True)
    config = DDPOConfig(
        num_epochs=1, sample_num_steps=2, sample_batch_size=2, sample_num_batches_per_epoch=2, train_batch_size=2,
        train_gradient_accumulation_steps=1, sample_guidance_scale=5.0, mixed_precision="no", log_with=None,
        per_prompt_stat_tracking=False, allow_tf32=False, async_reward_computation=True, max_workers=2,
        project_kwargs={"project_dir": str(tmp_path / "run")},
    )
    assert config.async_reward_computation
    prompts = iter(["a red cube", "a blue ball", "a green tree", "a yellow car"])
    trainer = DDPOTrainer(config, recording_reward_fn, lambda: (next(prompts), {}), sd_pipeline)
    lora_before = {n: p.detach().clone() for n, p in sd_pipeline.unet.named_parameters() if p.requires_grad}
    trainer.train()

    assert len(calls) == 2 and threads and "MainThread" not in threads  # scored in trl's thread pool
    for images, prompts_, rewards, info in calls:
        assert rewards.shape == (2,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
        assert set(info) == {"dinalrm", "avg"}
        direct = reward_fn.reward(latents=images_to_latents(images, tiny_pipe), prompts=prompts_)["avg"]
        assert torch.allclose(rewards, direct, atol=1e-6)
    assert any(not torch.equal(p, lora_before[n]) for n, p in sd_pipeline.unet.named_parameters() if p.requires_grad)
