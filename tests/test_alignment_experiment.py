"""The colour-world alignment experiment: its statistics and rewards, and (slow) the mechanism end to end:
ReFL with the learned latent reward raises the GOLDEN reward on held-out prompts, by a margin that a random
reward model and the sign-flipped learned reward do not reach."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks.alignment_report import aggregate, compute_table, t_interval
from benchmarks.alignment_rewards import (
    EnsembleReward,
    PixelReward,
    PixelRewardModel,
    SignFlippedReward,
    load_pixel_model,
    save_pixel_model,
)
from benchmarks.alignment_runs import spearman


def test_t_interval_and_spearman():
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(t_interval([5.0])[1]) and t_interval([5.0])[0] == 5.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_aggregate_gap_share_and_table():
    runs = [{"golden_before": 0.5, "golden_after": 0.5 + g, "learned_before": 0.0, "learned_after": 1.0,
             "spearman_golden_learned": 1.0, "steps": 10, "run_cpu_s": 1.0, "update_wall_s": 2.0,
             "flops_per_update": 1e9, "stopped_early": None} for g in (0.1, 0.2, 0.3)]
    a = aggregate(runs, ceiling=0.9)
    assert a["golden_gain"]["mean"] == pytest.approx(0.2) and a["fraction_of_gap"]["mean"] == pytest.approx(0.5)
    assert a["train_tflops"] == pytest.approx(0.01) and a["gain_per_tflop"][0] == pytest.approx(20.0)
    table = compute_table({"x": a}, ["x", "missing"])
    assert "| x | 3 | 0.500 ± 0.000 | 0.700 ± 0.248 | 0.200 ± 0.248 | 0.50 ± 0.62 |" in table
    assert "missing" not in table


class _Scorer:
    """A stand-in latent reward scorer: raw = sum of the latents times u (so the level is visible)."""

    model = None

    def latent_shape(self, shape):
        return shape

    def normalize(self, raw, offset=None, scale=None):
        return (raw + 10.0) / 10.0

    def score(self, latents, cond, prompts, *, u, noise=None, n_noise=1, ensemble=None):
        assert ensemble is None  # the wrappers forward the scorer's options
        return latents.flatten(1).sum(1) * u


def test_reward_wrappers():
    z = torch.ones(2, 4, 2, 2)
    base = _Scorer()
    ens = EnsembleReward(base, (0.2, 0.5, 0.7))
    torch.testing.assert_close(ens.score(z, None, ["a", "b"], u=0.4), torch.full((2,), 16 * (0.2 + 0.5 + 0.7) / 3))
    torch.testing.assert_close(SignFlippedReward(base).score(z, None, ["a", "b"], u=0.4, ensemble=None),
                               torch.full((2,), -6.4))
    assert ens.latent_shape((4, 2, 2)) == (4, 2, 2) and float(ens.normalize(torch.tensor(0.0))) == 1.0


def test_pixel_reward_is_differentiable_through_the_vae(tmp_path, tiny_pipe):
    from dinalrm_align.backbones.registry import adapter_for

    model = PixelRewardModel(text_dim=64, width=8)
    path = save_pixel_model(model, tmp_path / "pixel.safetensors")
    loaded = load_pixel_model(path)
    images, text = torch.rand(3, 3, 32, 32), torch.randn(3, 64)
    torch.testing.assert_close(loaded(images, text), model(images, text))
    reward = PixelReward(loaded, tiny_pipe, adapter_for(tiny_pipe), lambda prompts: torch.randn(len(prompts), 64))
    latents = torch.randn(2, 16, 16, 16, requires_grad=True)
    raw = reward.score(latents, None, ["a red cube", "a blue ball"], u=0.4)
    assert raw.shape == (2,) and torch.isfinite(raw).all()
    raw.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="pixel reward model not found"):
        load_pixel_model(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_golden_reward_rises_with_the_learned_reward_and_not_with_controls(tmp_path):
    from benchmarks.alignment import main

    out_json = tmp_path / "alignment_quick.json"
    assert main(["--quick", "--out", str(tmp_path / "work"), "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    res = data["results"]
    latent = res["ReFL, latent reward u=0.4"]
    random_rm, flipped = res["ReFL, random reward model"], res["ReFL, sign-flipped reward"]
    assert latent["n"] == 3 and len(data["runs"]["ReFL, latent reward u=0.4"]) == 3
    gain = latent["golden_gain"]["mean"]
    # every seed starts from the same held-out samples (same base policy, same evaluation noise)
    assert np.ptp(latent["golden_before"]["values"]) < 1e-6
    # on average over the seeds, with margins that the random and the sign-flipped reward fail (single seeds
    # are not asserted: how fast this tiny reward model leaves its early plateau varies with the floating-point
    # environment, measured 61.5-83.5 % held-out accuracy for this size, mean gains 0.016-0.018)
    assert gain > 0.01, latent["golden_gain"]
    assert gain > random_rm["golden_gain"]["mean"] + 0.01
    assert gain > flipped["golden_gain"]["mean"] + 0.02 and flipped["golden_gain"]["mean"] < 0.005
    # ReFL raised what it optimised in every configuration, the flipped reward included
    assert latent["learned_after"]["mean"] > latent["learned_before"]["mean"]
    assert flipped["learned_after"]["mean"] > flipped["learned_before"]["mean"]
    assert 0.0 < data["setup"]["ceiling"] <= 1.0 and data["setup"]["latent_rm"]["accuracy"]["0.4"] > 0.6
    for path in data["pictures"].values():
        from PIL import Image

        with Image.open(path) as img:
            assert img.format == "PNG"
