"""ReFL on the tiny models: what trains, where the gradient flows (x0_hat, both CFG branches), the
regulariser's noise levels, device-side metrics, that the reward rises, and that the saved LoRA / full
transformer reload with diffusers and reproduce the trained outputs."""

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


pytestmark = pytest.mark.usefixtures("fresh_trainer_state")


def make_trainer(tmp: Path, *overrides: str):
    from dinalrm_align.trainer.config import load_train_config
    from dinalrm_align.trainer.loop import Trainer

    cfg = load_train_config(TINY, [f"data.prompts={PROMPTS}", f"run_dir={tmp}", *overrides])
    return Trainer(cfg, progress=False)


def update(trainer) -> dict[str, float]:
    """One optimizer update through the trainer; the metrics as they are logged (``train/...``, ``perf/...``)."""
    from dinalrm_align.trainer.metrics import MetricBuffer

    buffer = MetricBuffer()
    assert trainer._update(buffer), "the update was skipped"
    values = buffer.reduce(trainer.accelerator)
    return {(f"perf/{k}" if k in ("step_time_s", "peak_mem_gb") else f"train/{k}"): v for k, v in values.items()}


def lora_grads(transformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n and p.grad is not None}


def test_one_update_changes_only_the_lora(tmp_path):
    trainer = make_trainer(tmp_path, *FAST, "train.max_steps=1")
    trainer.setup()
    ctx = trainer.algorithm.ctx
    before = {n: p.detach().clone() for n, p in ctx.transformer.named_parameters()}
    rm_before = {n: p.detach().clone() for n, p in ctx.reward.model.named_parameters()}
    metrics = update(trainer)
    assert {
        "train/loss",
        "train/reward_raw_mean",
        "train/reward_raw_std",
        "train/reward_norm_mean",
        "train/grad_norm",
        "train/lr",
        "train/epoch",
        "train/ema_decay",
        "train/k",
        "train/sigma_k",
        "perf/step_time_s",
        "perf/peak_mem_gb",
    } <= set(metrics)
    assert 2 <= metrics["train/k"] <= 3 and 0 < metrics["train/sigma_k"] < 1
    assert metrics["train/loss"] == pytest.approx(-metrics["train/reward_norm_mean"], rel=1e-5)
    assert trainer.step == 1 and metrics["train/epoch"] == pytest.approx(2 / 12)  # 2 of 12 training prompts
    changed = {n for n, p in ctx.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the update changed nothing"
    assert all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed)
    assert all(torch.equal(p, rm_before[n]) for n, p in ctx.reward.model.named_parameters())


def test_train_step_returns_device_tensors(tmp_path, monkeypatch):
    """The hot path never moves a value to the host: loss / reward metrics are tensors, no ``.item()``."""
    trainer = make_trainer(tmp_path, *FAST, "train.max_steps=1")
    trainer.setup()
    trainer.algorithm.train_step(trainer.data.next_batch())  # warm-up: builds the cached schedule once
    trainer.optimizer.zero_grad(set_to_none=True)
    batch = trainer.data.next_batch()

    def no_sync(self, *args, **kwargs):
        raise AssertionError("train_step called Tensor.item() (a host synchronisation)")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    metrics = trainer.algorithm.train_step(batch)
    monkeypatch.undo()
    for key in ("loss", "reward_raw", "reward_norm", "sigma_k"):
        value = metrics[key]
        assert torch.is_tensor(value) and not isinstance(value, float), (key, type(value))
        assert value.device == trainer.accelerator.device and not value.requires_grad
    assert metrics["loss"].ndim == 0 and metrics["reward_raw"].shape == (2,)


def _policy_and_rm():
    from dinalrm_align.backbones.registry import get_adapter
    from dinalrm_align.reward_model.text import encode_conditioning
    from dinalrm_align.tiny import tiny_reward_model, tiny_sd3_pipeline
    from dinalrm_align.trainer.config import ModelConfig
    from dinalrm_align.trainer.policy import make_trainable

    adapter = get_adapter("sd3")
    pipe = tiny_sd3_pipeline(seed=0)
    rm = tiny_reward_model(pipe.transformer, seed=0)  # before the policy LoRA: copies the blocks
    rm.requires_grad_(False)
    make_trainable(pipe.transformer, ModelConfig(pretrained="tiny"), adapter)
    cond = encode_conditioning(pipe, ["a red cube", "a blue ball"], 16)
    return pipe, adapter, rm, cond


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_reaches_policy_only_through_x0_hat(detach):
    from dinalrm_align.algorithms.refl import refl_reward
    from dinalrm_align.sampling.rollout import Denoiser

    pipe, adapter, rm, cond = _policy_and_rm()
    tr = pipe.transformer
    z_k = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(0.3)
    v = Denoiser(adapter, tr)(z_k, sigma, cond)
    noise = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(1))

    def score(x0: torch.Tensor) -> torch.Tensor:
        return rm.score_conditioning(x0, cond, u=0.4, noise=noise)

    loss, info = refl_reward(score, z_k, v, sigma, lambda raw: (raw + 10) / 10, detach_x0=detach)
    assert info["reward_raw"].shape == (2,) and not info["reward_raw"].requires_grad
    torch.testing.assert_close(info["reward_norm"], (info["reward_raw"] + 10) / 10)
    torch.testing.assert_close(loss.detach(), -info["reward_norm"].mean())
    torch.testing.assert_close(info["x0_hat"].detach(), z_k - 0.3 * v.detach(), rtol=1e-5, atol=1e-5)
    if detach:
        assert not loss.requires_grad
        return
    loss.backward()
    lora_b = [p.grad for n, p in tr.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None for g in lora_b)
    assert sum(float(g.abs().sum()) for g in lora_b) > 0
    assert all(p.grad is None for n, p in tr.named_parameters() if "lora_" not in n)
    assert all(p.grad is None for p in rm.parameters())


def test_cfg_train_gradients_flow_through_both_branches(tmp_path):
    """``cfg_train``: the graded forward runs both CFG branches (one batched call of 2B); with
    ``detach_uncond: false`` the gradient also flows through the unconditional one, so it differs from the
    detached gradient computed from the same rollout; without ``cfg_train`` the graded call has batch B."""
    trainer = make_trainer(tmp_path, *FAST, "train.max_steps=1", "algorithm.cfg_train=true",
                           "algorithm.detach_uncond=false")
    trainer.setup()
    algo, ctx = trainer.algorithm, trainer.algorithm.ctx
    batches: list[int] = []
    hook = ctx.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]) if torch.is_grad_enabled() else None,
        with_kwargs=True,
    )
    prompts = trainer.data.next_batch()
    state = algo.generator.get_state()

    def grads(**settings) -> dict[str, torch.Tensor]:
        for key, value in settings.items():
            setattr(algo.config, key, value)
        algo.generator.set_state(state)  # the same k, start noise and reward noise
        trainer.optimizer.zero_grad(set_to_none=True)
        batches.clear()
        algo.train_step(prompts)
        return lora_grads(ctx.transformer)

    both = grads(detach_uncond=False)
    assert batches == [2 * len(prompts)]  # uncond + cond in one graded call
    detached = grads(detach_uncond=True)
    again = grads(detach_uncond=False)
    cond_only = grads(cfg_train=False)
    assert batches == [len(prompts)]
    hook.remove()
    assert both.keys() == detached.keys() == cond_only.keys() and both
    for name in both:
        torch.testing.assert_close(again[name], both[name])  # reproducible from the generator state
    assert any(not torch.allclose(both[n], detached[n], rtol=1e-3, atol=1e-8) for n in both)
    assert any(not torch.allclose(both[n], cond_only[n], rtol=1e-3, atol=1e-8) for n in both)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short tiny ReFL run (default 8-step recipe) with proxy rewards; returns the finished trainer."""
    from accelerate.state import AcceleratorState, GradientState

    tmp = tmp_path_factory.mktemp("refl_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
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


@pytest.mark.slow
def test_reward_rises_over_a_short_run(trained):
    trainer, summary = trained
    before, after = summary.eval_before["eval/reward_raw"], summary.eval_after["eval/reward_raw"]
    assert after > before + 0.01, (before, after)
    assert "eval/proxy/brightness" in summary.eval_after and "eval/proxy/lnorm" in summary.eval_after
    assert {"eval/hacking_gap/brightness", "eval/hacking_gap/lnorm"} <= set(summary.eval_after)
    run = Path(summary.run_dir)
    assert (run / "eval" / "step_000000.png").is_file() and (run / "eval" / "step_000012.png").is_file()
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    text = summary.format()
    assert f"reward_raw       {before:.4f} -> {after:.4f}" in text and "proxy/brightness" in text


def test_eval_grid_has_captions(trained):
    import numpy as np
    from PIL import Image

    _, summary = trained
    with Image.open(Path(summary.run_dir) / "eval" / "step_000012.png") as img:
        grid = np.asarray(img.convert("RGB"))
    cell = 192  # 64 px eval images upscaled to the 192 px minimum cell; 4 prompts in one row of 4
    assert grid.shape[1] == 4 * (cell + 4) + 4
    assert grid.shape[0] > cell + 2 * 4 + 3 * 12  # the image row plus at least three caption lines
    caption = grid[4 + cell + 2 :, 4 : 4 + cell]
    assert (caption < 100).any() and (caption == 255).any()  # dark text on white under the image


def test_saved_lora_loads_with_diffusers_and_reproduces_outputs(trained):
    from dinalrm_align.backbones.conditioning import TextConditioning
    from dinalrm_align.backbones.registry import get_adapter
    from dinalrm_align.tiny import tiny_sd3_pipeline

    trainer, summary = trained
    adapter = get_adapter("sd3")
    transformer = trainer.algorithm.ctx.transformer
    final = Path(summary.final_dir)
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / "README.md").is_file()
    fresh = tiny_sd3_pipeline(seed=0)
    fresh.load_lora_weights(final)
    cond = TextConditioning(torch.randn(2, 77 + 16, 32, generator=torch.Generator().manual_seed(0)),
                            torch.randn(2, 64, generator=torch.Generator().manual_seed(1)))
    z = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        transformer.eval()
        with trainer.ema.swapped():
            expected = adapter.velocity(transformer, z, 0.5, cond)
        live = adapter.velocity(transformer, z, 0.5, cond)
        got = adapter.velocity(fresh.transformer, z, 0.5, cond)
        base = adapter.velocity(tiny_sd3_pipeline(seed=0).transformer, z, 0.5, cond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (expected - base).abs().max() > 1e-4  # the LoRA does something
    assert (expected - live).abs().max() > 0  # the EMA weights were saved, not the live ones


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
    metrics = update(trainer)
    assert metrics["train/k"] == pytest.approx(2.5)  # the two distinct k in [2, 3]
    assert {"train/loss_fm", "train/loss_refl"} <= set(metrics)
    mixed = (metrics["train/loss_refl"] + 0.5 * metrics["train/loss_fm"]) / 1.5
    assert metrics["train/loss"] == pytest.approx(mixed, rel=1e-5)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_fm_sigma_sampling_draws_from_the_training_table(tmp_path):
    from dinalrm_align.reward_model.noise import sigma_table
    from dinalrm_align.trainer.data import save_latent_dataset

    data = save_latent_dataset(tmp_path / "fm.safetensors", torch.randn(3, 16, 32, 32), ["a", "b", "c"])
    trainer = make_trainer(tmp_path, *FAST, "train.max_steps=1", "algorithm.fm_lambda=1.0",
                           f"algorithm.fm_dataset={data}", "algorithm.fm_batch_size=64")
    assert trainer.config.algorithm.fm_sigma_sampling == "table_index"  # the default
    trainer.setup()
    algo, ctx = trainer.algorithm, trainer.algorithm.ctx
    table = sigma_table(dict(ctx.pipeline.scheduler.config))[0]
    assert table.shape == (1000,)
    x_t, sigma, noise, x0, cond = algo._fm_batch(ctx)
    assert sigma.shape == (64,) and len(cond) == 64
    assert bool(torch.isin(sigma, table).all())  # exact entries of the scheduler's training table
    assert len(set(sigma.tolist())) > 32  # uniform over 1000 indices: mostly distinct
    torch.testing.assert_close(x_t, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise)
    for mode in ("uniform", "logit_normal"):
        algo.config.fm_sigma_sampling = mode
        other = algo._fm_batch(ctx)[1]
        assert not bool(torch.isin(other, table).any()) and bool(((other > 0) & (other < 1)).all()), mode


def test_full_finetune_saves_a_loadable_transformer(tmp_path):
    from diffusers import SD3Transformer2DModel

    from dinalrm_align.backbones.conditioning import TextConditioning
    from dinalrm_align.backbones.registry import get_adapter

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
    adapter = get_adapter("sd3")
    loaded = SD3Transformer2DModel.from_pretrained(summary.final_dir).eval()
    cond = TextConditioning(torch.randn(1, 77 + 16, 32), torch.randn(1, 64))
    z = torch.randn(1, 16, 32, 32)
    transformer = trainer.algorithm.ctx.transformer
    with torch.no_grad():
        transformer.eval()
        torch.testing.assert_close(adapter.velocity(loaded, z, 0.5, cond), adapter.velocity(transformer, z, 0.5, cond))


def test_bf16_keeps_trainable_weights_fp32(tmp_path):
    trainer = make_trainer(tmp_path, *FAST, "train.max_steps=1", "train.mixed_precision=bf16")
    trainer.setup()
    ctx = trainer.algorithm.ctx
    dtypes = {n: p.dtype for n, p in ctx.transformer.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    assert ctx.pipeline.vae.dtype == torch.float32
    metrics = update(trainer)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.params)


def test_policy_and_reward_model_load_from_folders(tmp_path):
    from dinalrm_align.tiny import tiny_reward_model, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed=3)
    pipe.save_pretrained(tmp_path / "pipe")
    tiny_reward_model(pipe.transformer, seed=3).save_pretrained(tmp_path / "rm")
    trainer = make_trainer(
        tmp_path / "run", *FAST, "train.max_steps=1",
        f"model.pretrained={tmp_path / 'pipe'}", f"reward.model={tmp_path / 'rm'}",
    )
    trainer.setup()
    ref = tiny_sd3_pipeline(seed=3).transformer.pos_embed.proj.weight
    assert torch.equal(trainer.algorithm.ctx.transformer.pos_embed.proj.weight, ref)
    assert torch.isfinite(torch.tensor(update(trainer)["train/loss"]))


def test_missing_models_raise_clear_errors(tmp_path):
    from dinalrm_align.trainer.config import ModelConfig
    from dinalrm_align.trainer.policy import load_pipeline

    with pytest.raises(FileNotFoundError, match="model.pretrained folder not found"):
        load_pipeline(ModelConfig(pretrained=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError) as err:
        load_pipeline(ModelConfig(pretrained="no-such-org/no-such-model"))
    assert "no-such-org/no-such-model" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_shared_reward_backbone_with_lora_policy(tmp_path):
    trainer = make_trainer(tmp_path, *FAST, "train.max_steps=1", "reward.share_base_weights=true")
    trainer.setup()
    rm = trainer.algorithm.ctx.reward.model
    rm_before = {n: p.detach().clone() for n, p in rm.named_parameters() if "lora_" in n or "head" in n}
    assert rm_before
    metrics = update(trainer)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    params = dict(rm.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in rm_before.items())


def test_kl_penalty_to_the_lora_disabled_policy(tmp_path):
    """kl_beta: the penalty is exactly 0 while the LoRA is still zero (v == v_ref), positive once it has
    moved, adapters are enabled again after the reference forward, and a full fine-tune is refused."""
    trainer = make_trainer(tmp_path, *FAST, "algorithm.kl_beta=10.0", "train.max_steps=3", "optim.lr=5e-2")
    trainer.setup()
    first = update(trainer)
    assert first["train/kl_loss"] == 0.0
    update(trainer)
    later = update(trainer)
    assert later["train/kl_loss"] > 0
    ctx = trainer.algorithm.ctx  # the adapters are enabled again after the reference forward
    x = torch.randn(1, *ctx.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = ctx.encode(["a red cube"])
    with torch.no_grad():
        v = ctx.denoiser(ctx.transformer)(x, 0.5, cond)
        with ctx.reference_policy() as ref:
            v_ref = ctx.denoiser(ref)(x, 0.5, cond)
        again = ctx.denoiser(ctx.transformer)(x, 0.5, cond)
    assert not torch.allclose(v, v_ref) and torch.equal(v, again)
    with pytest.raises(ValueError, match="kl_beta > 0 needs a LoRA policy"):
        make_trainer(tmp_path / "full", *FAST, "algorithm.kl_beta=1.0", "model.finetune=full").preflight()


def test_ensemble_reward_is_the_models_multi_level_score(tmp_path):
    """reward.ensemble scores with the model's DiNa-LRM* ensemble (one shared noise, levels concatenated)."""
    trainer = make_trainer(tmp_path, *FAST, "reward.ensemble=[0.2,0.5,0.7]", "train.max_steps=1")
    trainer.setup()
    ctx = trainer.algorithm.ctx
    prompts = ["a red cube", "a blue ball"]
    cond = ctx.encode(prompts)
    x0 = torch.randn(2, *ctx.latent_shape, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 2, *ctx.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ctx.score_reward(x0, cond, prompts, noise=noise)
        want = ctx.reward.model.score_ensemble(x0, prompt_embeds=cond, us=[0.2, 0.5, 0.7], noise=noise[0])
        single = ctx.reward.model.score_conditioning(x0, cond, u=0.4, noise=noise)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, single)
    with pytest.raises(ValueError, match="reward.n_noise"):
        make_trainer(tmp_path / "x", "reward.ensemble=[0.2,0.5]", "reward.n_noise=2")
