"""ReFL on the tiny models: what trains, where the gradient flows, that the reward rises, and that
the saved LoRA / full transformer reload with diffusers and reproduce the trained outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_refl.yaml"
PROMPTS = REPO / "recipes" / "prompts" / "tiny_prompts.txt"
FAST = [
    "sampling.num_steps=4",
    "algorithm.k_min=2",
    "algorithm.k_max=3",
    "eval.num_steps=4",
    "train.batch_size=2",
]


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Proxy reward on decoded images (B, 3, H, W) in [0, 1]."""
    return images.mean(dim=(1, 2, 3))


def latent_norm(latents: torch.Tensor, prompts: list[str], scale: float = 1.0) -> list[float]:
    """Proxy reward on latents (B, 16, h, w)."""
    return (latents.flatten(1).norm(dim=1) * scale).tolist()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_trainer(tmp: Path, *overrides: str):
    from dinalrm_align.trainer.config import load_train_config
    from dinalrm_align.trainer.loop import Trainer

    cfg = load_train_config(TINY, [f"data.prompts={PROMPTS}", f"run_dir={tmp}", *overrides])
    return Trainer(cfg)


def test_one_update_changes_only_the_lora(tmp_path):
    trainer = make_trainer(tmp_path, *FAST, "train.max_steps=1")
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters()}
    rm_before = {n: p.detach().clone() for n, p in trainer.reward_model.named_parameters()}
    metrics = trainer._update()
    assert {
        "train/loss",
        "train/reward_raw_mean",
        "train/reward_raw_std",
        "train/reward_norm_mean",
        "train/grad_norm",
        "train/lr",
        "train/k",
        "train/sigma_k",
        "perf/samples_per_s",
        "perf/step_time_s",
        "perf/peak_mem_gb",
    } <= set(metrics)
    assert 2 <= metrics["train/k"] <= 3 and 0 < metrics["train/sigma_k"] < 1
    changed = {n for n, p in trainer.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the update changed nothing"
    assert all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed)
    assert all(torch.equal(p, rm_before[n]) for n, p in trainer.reward_model.named_parameters())


def _policy_and_rm():
    from dinalrm_align.reward_model.text import encode_prompts
    from dinalrm_align.testing import tiny_reward_model, tiny_sd3_pipeline
    from dinalrm_align.trainer.config import ModelConfig
    from dinalrm_align.trainer.policy import make_trainable

    pipe = tiny_sd3_pipeline(seed=0)
    rm = tiny_reward_model(pipe.transformer, seed=0)  # before the policy LoRA: copies the blocks
    make_trainable(pipe.transformer, ModelConfig(pretrained="tiny"))
    pe, pooled = encode_prompts(pipe, ["a red cube", "a blue ball"], max_sequence_length=16)
    return pipe, rm, pe, pooled


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_reaches_policy_only_through_x0_hat(detach):
    from dinalrm_align.algorithms.refl import refl_reward
    from dinalrm_align.sampling.rollout import predict_velocity

    pipe, rm, pe, pooled = _policy_and_rm()
    tr = pipe.transformer
    z_k = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(0.3)
    v = predict_velocity(tr, z_k, sigma, pe, pooled, timestep_kind="sigma")
    noise = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    loss, info = refl_reward(rm, z_k, v, sigma, pe, pooled, u=0.4, noise=noise, detach_x0=detach)
    assert info["reward_raw"].shape == (2,)
    torch.testing.assert_close(info["x0_hat"], z_k - 0.3 * v.detach(), rtol=1e-5, atol=1e-5)
    if detach:
        assert not loss.requires_grad
        return
    loss.backward()
    lora_b = [p.grad for n, p in tr.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None for g in lora_b)
    assert sum(float(g.abs().sum()) for g in lora_b) > 0
    assert all(p.grad is None for n, p in tr.named_parameters() if "lora_" not in n)
    assert all(p.grad is None for p in rm.parameters())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short tiny ReFL run (default 8-step recipe) with proxy rewards; returns the finished trainer."""
    from accelerate.state import AcceleratorState, GradientState

    tmp = tmp_path_factory.mktemp("refl_run")
    threads = torch.get_num_threads()
    trainer = make_trainer(
        tmp,
        "train.max_steps=12",
        "eval.every=0",
        "checkpoint.every=0",
        "eval.proxy_rewards=[{target: 'test_refl:brightness'}, "
        "{name: lnorm, target: 'test_refl.latent_norm', inputs: latents, kwargs: {scale: 2.0}}]",
    )
    summary = trainer.train()
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return trainer, summary


def test_reward_rises_over_a_short_run(trained):
    trainer, summary = trained
    before, after = summary.eval_before["eval/reward_raw"], summary.eval_after["eval/reward_raw"]
    assert after > before + 0.01, (before, after)
    assert "eval/proxy/brightness" in summary.eval_after and "eval/proxy/lnorm" in summary.eval_after
    run = Path(summary.run_dir)
    assert (run / "eval" / "step_000000.png").is_file() and (run / "eval" / "step_000012.png").is_file()
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert "eval reward      before" in summary.format()


def test_saved_lora_loads_with_diffusers_and_reproduces_outputs(trained):
    from dinalrm_align.sampling.rollout import predict_velocity
    from dinalrm_align.testing import tiny_sd3_pipeline

    trainer, summary = trained
    final = Path(summary.final_dir)
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    fresh = tiny_sd3_pipeline(seed=0)
    fresh.load_lora_weights(final)
    pe = torch.randn(2, 77 + 16, 32, generator=torch.Generator().manual_seed(0))
    pooled = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trainer.transformer.eval()
        with trainer.ema.swapped():
            expected = predict_velocity(trainer.transformer, z, 0.5, pe, pooled)
        got = predict_velocity(fresh.transformer, z, 0.5, pe, pooled)
        base = predict_velocity(tiny_sd3_pipeline(seed=0).transformer, z, 0.5, pe, pooled)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (expected - base).abs().max() > 1e-4  # the LoRA does something


def test_branches_regulariser_and_checkpointing_in_one_update(tmp_path):
    from dinalrm_align.trainer.data import save_latent_dataset

    data = save_latent_dataset(
        tmp_path / "fm.safetensors", torch.randn(4, 16, 32, 32), ["a red cube"] * 2 + ["a cat"] * 2
    )
    trainer = make_trainer(
        tmp_path,
        *FAST,
        "train.max_steps=1",
        "algorithm.grad_steps_per_rollout=2",
        "algorithm.fm_lambda=0.5",
        f"algorithm.fm_dataset={data}",
        "model.gradient_checkpointing=true",
    )
    trainer.setup()
    assert trainer.accelerator.gradient_accumulation_steps == 2
    metrics = trainer._update()
    assert metrics["train/k"] == pytest.approx(2.5)  # the two distinct k in [2, 3]
    assert {"train/loss_fm", "train/loss_refl"} <= set(metrics)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_full_finetune_saves_a_loadable_transformer(tmp_path):
    from diffusers import SD3Transformer2DModel

    from dinalrm_align.sampling.rollout import predict_velocity

    trainer = make_trainer(
        tmp_path,
        *FAST,
        "train.max_steps=1",
        "model.finetune=full",
        "ema.enabled=false",
        "eval.at_start=false",
        "eval.at_end=false",
        "optim.lr=1e-4",
    )
    summary = trainer.train()
    loaded = SD3Transformer2DModel.from_pretrained(summary.final_dir).eval()
    pe = torch.randn(1, 77 + 16, 32)
    pooled = torch.randn(1, 64)
    z = torch.randn(1, 16, 32, 32)
    with torch.no_grad():
        trainer.transformer.eval()
        torch.testing.assert_close(
            predict_velocity(loaded, z, 0.5, pe, pooled),
            predict_velocity(trainer.transformer, z, 0.5, pe, pooled),
        )


def test_bf16_keeps_trainable_weights_fp32(tmp_path):
    trainer = make_trainer(tmp_path, *FAST, "train.max_steps=1", "train.mixed_precision=bf16")
    trainer.setup()
    dtypes = {n: p.dtype for n, p in trainer.transformer.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    assert trainer.pipeline.vae.dtype == torch.float32
    metrics = trainer._update()
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.params)


def test_policy_and_reward_model_load_from_folders(tmp_path):
    from dinalrm_align.testing import tiny_reward_model, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed=3)
    pipe.save_pretrained(tmp_path / "pipe")
    tiny_reward_model(pipe.transformer, seed=3).save_pretrained(tmp_path / "rm")
    trainer = make_trainer(
        tmp_path / "run", *FAST, "train.max_steps=1",
        f"model.pretrained={tmp_path / 'pipe'}", f"reward.model={tmp_path / 'rm'}",
    )
    trainer.setup()
    ref = tiny_sd3_pipeline(seed=3).transformer.pos_embed.proj.weight
    assert torch.equal(trainer.transformer.pos_embed.proj.weight, ref)
    assert torch.isfinite(torch.tensor(trainer._update()["train/loss"]))


def test_missing_models_raise_clear_errors(tmp_path):
    from dinalrm_align.trainer.config import ModelConfig
    from dinalrm_align.trainer.policy import load_pipeline

    with pytest.raises(FileNotFoundError, match="policy pipeline folder not found"):
        load_pipeline(ModelConfig(pretrained=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError) as err:
        load_pipeline(ModelConfig(pretrained="no-such-org/no-such-model"))
    assert "no-such-org/no-such-model" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_shared_reward_backbone_with_lora_policy(tmp_path):
    trainer = make_trainer(tmp_path, *FAST, "train.max_steps=1", "reward.share_base_weights=true")
    trainer.setup()
    rm_before = {n: p.detach().clone() for n, p in trainer.reward_model.named_parameters() if "lora_" in n or "head" in n}
    metrics = trainer._update()
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    params = dict(trainer.reward_model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in rm_before.items())
