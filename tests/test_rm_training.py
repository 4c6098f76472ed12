"""Reward-model training end to end on tiny models: learning, EMA, released-layout checkpoints, resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dinalrm_align.reward_model.model import LatentRewardModel
from dinalrm_align.rm_training.config import load_rm_train_config
from dinalrm_align.rm_training.data import PairRecord, write_shard
from dinalrm_align.rm_training.train import RewardModelTrainer

PROMPTS = ("a red cube", "a blue ball")


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
        records.append(PairRecord(prompt=prompt, chosen=a, rejected=b, votes_chosen=3, votes_rejected=1, height=16, width=16))
    write_shard(root / "part_00000.parquet", records[: n // 2])
    write_shard(root / "part_00001.parquet", records[n // 2 :])


def _config(tmp_path, data, run, **over):
    raw = {
        "run_dir": str(tmp_path / run),
        "seed": 0,
        "data": {"train": str(data), "num_eval": 64},
        "model": {"pipeline": "tiny", "preset": "tiny", "max_sequence_length": 4},
        "loss": {"u_sampler": "logit_normal"},
        "optim": {"lr": 3e-3},
        "train": {"max_steps": 40, "batch_size": 8, "mixed_precision": "no", "num_threads": 1, "log_every": 10},
        "ema": {"decay": 0.8},
        "checkpoint": {"every": 20, "keep_last": 2},
        "eval": {"every": 0, "us": [0.4], "batch_size": 64},
        "tracking": {"log_with": "none"},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw[section][name] = value
    return load_rm_train_config(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rm_train")
    data = tmp_path / "pairs"
    _write_pairs(data)
    trainer = RewardModelTrainer(_config(tmp_path, data, "run"), progress=False)
    summary = trainer.train()
    return tmp_path, data, trainer, summary


def test_training_beats_chance_by_a_wide_margin(trained):
    _, _, trainer, summary = trained
    before, after = summary.eval_before["eval/accuracy_u0.4"], summary.eval_after["eval/accuracy_u0.4"]
    assert after >= 0.85 and after > before, (before, after)
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert np.mean(losses[-2:]) < losses[0]


def test_ema_is_a_real_average_used_for_saving(trained):
    _, _, trainer, _ = trained
    live = trainer._trainable_weights()
    ema = trainer.ema
    assert ema.num_updates == 40
    names = trainer.param_names
    diffs = [float((s - live[n]).abs().max()) for s, n in zip(ema.shadow, names)]
    assert max(diffs) > 1e-4  # the average lags the live weights
    saved = load_file(str(trainer.run_dir / "final" / "checkpoint" / "rm_head.safetensors"))
    head_names = [n for n in names if n.startswith("reward_head.")]
    for n in head_names[:5]:
        torch.testing.assert_close(saved[n.removeprefix("reward_head.")], ema.shadow[names.index(n)])


def test_final_and_step_checkpoints_load_with_from_pretrained(trained, tiny_text):
    _, _, trainer, _ = trained
    _, pe, pooled = tiny_text
    pipe = trainer.pipeline
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    loaded = LatentRewardModel.from_pretrained(trainer.run_dir / "final", transformer=pipe.transformer)
    rm = trainer.reward_model.eval()
    with torch.no_grad(), trainer.ema_weights():
        expected = rm.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4, noise=noise)
    with torch.no_grad():
        got = loaded.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4, noise=noise)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    step_model = trainer.run_dir / "checkpoints" / "step_000020" / "model"
    assert (step_model / "config.json").is_file()
    LatentRewardModel.from_pretrained(step_model, transformer=pipe.transformer)
    config = json.loads((trainer.run_dir / "final" / "config.json").read_text())
    assert config["rm_training"]["optim"]["lr"] == 3e-3 and config["model"]["num_transformer_layers"] == 4


def test_resume_reproduces_the_uninterrupted_run(trained):
    tmp_path, data, trainer, _ = trained
    resumed = RewardModelTrainer(
        _config(tmp_path, data, "resumed", checkpoint__resume=str(trainer.run_dir / "checkpoints" / "step_000020")),
        progress=False,
    )
    resumed.setup()
    assert resumed.step == 20
    resumed.train()
    a, b = trainer._trainable_weights(), resumed._trainable_weights()
    for name in list(a)[:: max(1, len(a) // 8)]:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_cli_errors_are_clear(tmp_path, capsys):
    from dinalrm_align.rm_training.cli import train_main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: /nonexistent\noptim:\n  lrr: 1\n")
    assert train_main([str(recipe)]) == 2
    assert "unknown key 'lrr'" in capsys.readouterr().err
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\ndata:\n  train: {tmp_path / 'missing'}\ntrain:\n  mixed_precision: 'no'\n")
    assert train_main([str(recipe)]) == 2
    assert "pair shards not found" in capsys.readouterr().err
