"""Reward-model training end to end on tiny models of every backbone: learning, EMA, released-layout
checkpoints, resume, CLI. Runs on the one trainer (``algorithm: reward_model``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dinalrm_align.reward_model.model import LatentRewardModel
from dinalrm_align.reward_model.text import encode_prompts
from dinalrm_align.rm_training.config import load_rm_train_config
from dinalrm_align.rm_training.data import PairRecord, write_shard
from dinalrm_align.trainer.loop import Trainer

PROMPTS = ("a red cube", "a blue ball")
PIPELINES = {"sd3": "tiny", "flux": "tiny-flux", "zimage": "tiny-zimage"}
STEPS = 40  # optimizer updates per run (checkpoint at the half)


def _write_pairs(root, n=256, seed=0):
    """The latent with the larger channel-0 mean wins (a learnable, noise-robust preference)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        a, b = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
        oa, ob = rng.uniform(-1.5, 1.5, 2)
        a[0] += oa
        b[0] += ob
        prompt = PROMPTS[i % 2]
        if oa < ob:
            a, b = b, a
        records.append(
            PairRecord(
                prompt=prompt, chosen=a, rejected=b, votes_chosen=3, votes_rejected=1, height=16, width=16
            )
        )
    write_shard(root / "part_00000.parquet", records[: n // 2])
    write_shard(root / "part_00001.parquet", records[n // 2 :])


def _config(tmp_path, data, run, backbone="sd3", **over):
    raw = {
        "run_dir": str(tmp_path / run),
        "seed": 0,
        # no prompt cache: a cached SD3 pooled embedding depends (at ~5e-7) on the batch it was first
        # encoded in, which a resumed run (cold cache) cannot reproduce; Adam amplifies that in
        # gradient-free directions
        "data": {"train": str(data), "num_eval": 64, "text_cache": 0},
        "model": {"pipeline": PIPELINES[backbone], "preset": "tiny", "max_sequence_length": 4},
        "loss": {"u_sampler": "logit_normal"},
        "optim": {"lr": 3e-3},
        "train": {
            "max_steps": STEPS,
            "batch_size": 8,
            "mixed_precision": "no",
            "num_threads": 1,
            "log_every": 10,
        },
        "ema": {"decay": 0.8},
        "checkpoint": {"every": STEPS // 2, "keep_last": 2},
        "eval": {"every": 0, "us": [0.4], "batch_size": 64},
        "tracking": {"log_with": "none"},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw[section][name] = value
    return load_rm_train_config(raw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    _write_pairs(root)
    return root


@pytest.fixture(scope="module", params=["sd3", "flux", "zimage"])
def trained(request, tmp_path_factory, data_dir):
    backbone = request.param
    tmp_path = tmp_path_factory.mktemp(f"rm_train_{backbone}")
    trainer = Trainer(_config(tmp_path, data_dir, "run", backbone), progress=False)
    summary = trainer.train()
    return backbone, tmp_path, data_dir, trainer, summary


def _trainable_names(trainer):
    return [n for n, p in trainer.model.named_parameters() if p.requires_grad]


def test_training_beats_chance_by_a_wide_margin(trained):
    backbone, _, _, trainer, summary = trained
    assert trainer.algorithm.rm.config.backbone == backbone
    before, after = summary.eval_before["eval/accuracy_u0.4"], summary.eval_after["eval/accuracy_u0.4"]
    assert after >= 0.85 and after > before, (before, after)
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert np.mean(losses[-2:]) < losses[0]


def test_ema_is_a_real_average_used_for_saving(trained):
    _, _, _, trainer, _ = trained
    live = trainer._trainable_state()
    ema = trainer.ema
    assert ema.num_updates == trainer.config.train.max_steps
    names = _trainable_names(trainer)
    shadow = ema.model.shadow_params
    assert len(shadow) == len(names) == len(live)
    diffs = [float((s.cpu() - live[n]).abs().max()) for s, n in zip(shadow, names)]
    assert max(diffs) > 1e-4  # the average lags the live weights
    saved = load_file(str(trainer.run_dir / "final" / "checkpoint" / "rm_head.safetensors"))
    head_names = [n for n in names if n.startswith("reward_model.reward_head.")]
    assert head_names
    for n in head_names[:5]:
        torch.testing.assert_close(
            saved[n.removeprefix("reward_model.reward_head.")], shadow[names.index(n)].cpu()
        )


def test_final_and_step_checkpoints_load_with_from_pretrained(trained):
    backbone, _, _, trainer, _ = trained
    pipe = trainer.algorithm.pipeline
    pe, pooled = encode_prompts(pipe, ["a red cube", "a blue ball", "a red cube", "a blue ball"], 4)
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler_config = dict(pipe.scheduler.config)
    loaded = LatentRewardModel.from_pretrained(
        trainer.run_dir / "final", transformer=pipe.transformer, scheduler_config=scheduler_config
    )
    assert loaded.config.backbone == backbone
    rm = trainer.algorithm.rm.eval()
    with torch.no_grad(), trainer.ema.swapped():
        expected = rm.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4, noise=noise)
    with torch.no_grad():
        got = loaded.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4, noise=noise)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    half = trainer.config.train.max_steps // 2
    step_model = trainer.run_dir / "checkpoints" / f"step_{half:06d}" / "model"
    assert (step_model / "config.json").is_file()
    step_rm = LatentRewardModel.from_pretrained(
        step_model, transformer=pipe.transformer, scheduler_config=scheduler_config
    )
    with torch.no_grad():  # an earlier model: other weights, other scores
        assert not torch.allclose(
            step_rm.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4, noise=noise), got
        )
    config = json.loads((trainer.run_dir / "final" / "config.json").read_text())
    assert config["rm_training"]["optim"]["lr"] == 3e-3
    assert config["model"]["backbone"] == backbone
    assert config["model"]["num_transformer_layers"] == trainer.algorithm.rm.config.num_transformer_layers


def test_training_leaves_the_pipeline_transformer_intact(trained):
    """The LoRA trains on the reward model's own block copies; the pipeline's transformer is unchanged."""
    from dinalrm_align.tiny import tiny_pipeline

    backbone, _, _, trainer, _ = trained
    fresh = tiny_pipeline(backbone, seed=0).transformer.state_dict()
    after = trainer.algorithm.pipeline.transformer.state_dict()
    assert set(after) == set(fresh)
    assert all(torch.equal(after[k], fresh[k]) for k in fresh)
    rm = trainer.algorithm.rm
    trained_lora = [p for n, p in rm.named_parameters() if "lora_B" in n]
    assert trained_lora and any(
        float(p.detach().abs().max()) > 0 for p in trained_lora
    )  # zero-initialised, now trained


def test_resume_reproduces_the_uninterrupted_run(trained):
    backbone, tmp_path, data, trainer, _ = trained
    half = trainer.config.train.max_steps // 2
    ckpt = trainer.run_dir / "checkpoints" / f"step_{half:06d}"
    resumed = Trainer(
        _config(tmp_path, data, "resumed", backbone, checkpoint__resume=str(ckpt)), progress=False
    )
    resumed.setup()
    assert resumed.step == half
    resumed.train()
    a, b = trainer._trainable_state(), resumed._trainable_state()
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for x, y in zip(trainer.ema.model.shadow_params, resumed.ema.model.shadow_params):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_cli_errors_are_clear(tmp_path, capsys):
    from dinalrm_align.rm_training.cli import train_main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: /nonexistent\noptim:\n  lrr: 1\n")
    assert train_main([str(recipe)]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err
    recipe.write_text(
        f"run_dir: {tmp_path / 'run'}\ndata:\n  train: {tmp_path / 'missing'}\n"
        "train:\n  mixed_precision: 'no'\n"
    )
    assert train_main([str(recipe)]) == 2
    assert "pair shards not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["flux", "zimage"])
def test_tiny_rm_recipe_runs_standalone_on_synthetic_pairs(tmp_path, backbone):
    """The tiny FLUX / Z-Image reward-model recipes write their own pairs (with the family's VAE) when
    absent, train on them and end better than chance on the held-out pairs."""
    from pathlib import Path

    from dinalrm_align.rm_training.data import PairDataset
    from dinalrm_align.trainer.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / f"tiny_{backbone}_rm.yaml"
    pairs = tmp_path / "pairs"
    config = load_recipe(recipe, [f"run_dir={tmp_path / 'run'}", f"data.train={pairs / 'train'}",
                                  f"data.eval={pairs / 'eval'}", "train.max_steps=60", "eval.every=0"])
    summary = Trainer(config, progress=False).train()
    assert len(PairDataset.from_source(pairs / "train")) == 512 and len(PairDataset.from_source(pairs / "eval")) == 128
    latent = PairDataset.from_source(pairs / "train").record(0)[1]
    assert latent.shape[0] == 16 and latent.shape[1:] == (16, 16)
    before, after = summary.eval_before["eval/accuracy_u0.4"], summary.eval_after["eval/accuracy_u0.4"]
    assert after > 0.65 and after > before + 0.1
    # a training checkpoint folder loads directly (its model/ export; the run's recipe config.yaml is skipped)
    from dinalrm_align.tiny import tiny_pipeline

    step = tmp_path / "run" / "checkpoints" / "step_000050"
    assert (tmp_path / "run" / "config.yaml").is_file() and (step / "model" / "config.json").is_file()
    assert LatentRewardModel.from_pretrained(step, transformer=tiny_pipeline(backbone).transformer).config.backbone == backbone
    again = load_recipe(recipe, [f"run_dir={tmp_path / 'run2'}", f"data.train={pairs / 'train'}",
                                 f"data.eval={pairs / 'eval'}", "train.max_steps=1", "eval.every=0"])
    mtime = (pairs / "train" / "part_00000.parquet").stat().st_mtime_ns
    Trainer(again, progress=False).preflight()  # existing pairs are reused, not rewritten
    assert (pairs / "train" / "part_00000.parquet").stat().st_mtime_ns == mtime
