"""Evaluation rules (ties count as wrong), deterministic scoring, calibration and the eval-rm command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinalrm_align.reward_model.model import LatentRewardModel
from dinalrm_align.rm_training import calibration as calib
from dinalrm_align.rm_training.data import PairDataset, PairRecord, write_shard
from dinalrm_align.rm_training.evaluate import (
    EvalSettings,
    pair_accuracy,
    ranked_accuracy,
    ranked_pair_counts,
    score_latents,
    score_pairs,
)


# ---------------------------------------------------------------------------------------- accuracy rules
def test_ranked_pairs_hand_made_set():
    # pairs: (0,1) ok, (0,2) ok, (0,3) ok, (1,2) equal ranks -> wrong, (1,3) wrong order, (2,3) equal scores -> wrong
    assert ranked_pair_counts([3.0, 1.0, 2.0, 2.0], [1, 2, 2, 3]) == (3, 6)
    assert ranked_pair_counts([0.1, 0.2], [2, 1]) == (1, 1)
    assert ranked_pair_counts([5.0], [1]) == (0, 0)
    assert ranked_accuracy([[3.0, 1.0, 2.0, 2.0], [0.1, 0.2]], [[1, 2, 2, 3], [2, 1]]) == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="same length"):
        ranked_pair_counts([1.0, 2.0], [1])


def test_pair_accuracy_ties_are_wrong():
    assert pair_accuracy(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 4.0])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        pair_accuracy(np.array([]), np.array([]))


def test_score_latents_is_seeded_and_averages_noise_draws(tiny_rm, tiny_text):
    _, pe, pooled = tiny_text
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = EvalSettings(us=(0.4,), ensemble=(0.2, 0.5), n_noise=3)
    noise = torch.randn(3, 4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = tiny_rm.conditioning(pe, pooled)
    avg = score_latents(tiny_rm, x, cond, "0.4", settings, torch.Generator(), noise)
    with torch.no_grad():
        each = [tiny_rm.score(x, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4, noise=noise[k]) for k in range(3)]
    torch.testing.assert_close(avg, torch.stack(each).mean(0), atol=1e-5, rtol=1e-5)
    one = EvalSettings(us=(0.4,), ensemble=(0.2, 0.5), n_noise=1)
    ens = score_latents(tiny_rm, x, cond, "ensemble", one, torch.Generator(), noise[:1])
    with torch.no_grad():
        ref = tiny_rm.score_ensemble(x, prompt_embeds=pe, pooled_prompt_embeds=pooled, us=(0.2, 0.5), noise=noise[0])
    torch.testing.assert_close(ens, ref, atol=1e-5, rtol=1e-5)


def _pairs(root, n=24, seed=0, size=8):
    rng = np.random.default_rng(seed)
    recs = [
        PairRecord(
            prompt=["a red cube", "a blue ball"][i % 2],
            chosen=rng.standard_normal((16, size, size)).astype(np.float32),
            rejected=rng.standard_normal((16, size, size)).astype(np.float32),
            votes_chosen=int(rng.integers(1, 5)),
            votes_rejected=int(rng.integers(0, 3)),
            height=2 * size,
            width=2 * size,
        )
        for i in range(n)
    ]
    write_shard(root / "part_00000.parquet", recs)
    return root


def test_score_pairs_is_deterministic(tmp_path, tiny_rm, tiny_pipe):
    from dinalrm_align.reward_model.text import encode_conditioning

    ds = PairDataset.from_source(_pairs(tmp_path))

    def encode(prompts):
        return encode_conditioning(tiny_pipe, prompts, 16)

    settings = EvalSettings(us=(0.3, 0.7), ensemble=None, seed=5, batch_size=10)
    a = score_pairs(tiny_rm, ds, encode, settings)
    b = score_pairs(tiny_rm, ds, encode, settings)
    np.testing.assert_array_equal(a.chosen["0.3"], b.chosen["0.3"])
    assert not np.array_equal(a.chosen["0.3"], a.chosen["0.7"])
    c = score_pairs(tiny_rm, ds, encode, EvalSettings(us=(0.3, 0.7), ensemble=None, seed=6, batch_size=10))
    assert not np.array_equal(a.chosen["0.3"], c.chosen["0.3"])
    assert set(a.accuracy()) == {"0.3", "0.7"}
    vc, vr = ds.index.votes_chosen.astype(float), ds.index.votes_rejected.astype(float)
    np.testing.assert_allclose(a.observed_preference(), vc / (vc + vr))


# ---------------------------------------------------------------------------------------- calibration
def test_ece_hand_computed():
    p, y = np.array([0.9, 0.9, 0.1]), np.array([1.0, 0.0, 0.0])
    assert calib.expected_calibration_error(p, y, n_bins=10) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.1)
    bins = calib.reliability_bins(p, y, 10)
    assert sum(b["count"] for b in bins) == 3 and bins[9]["mean_observed"] == 0.5
    assert calib.negative_log_likelihood(np.array([0.5]), np.array([1.0])) == pytest.approx(np.log(2))


def _miscalibrated(n=4000, seed=0, overconfidence=4.0):
    rng = np.random.default_rng(seed)
    d_true = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-d_true))).astype(np.float64)
    base = rng.normal(0.0, 1.0, n)
    chosen = np.where(y == 1, base + overconfidence * d_true, base)  # the winner is listed first
    rejected = np.where(y == 1, base, base + overconfidence * d_true)
    return chosen, rejected, np.ones(n)


def test_temperature_calibration_lowers_ece_and_nll():
    c, r, y = _miscalibrated()
    result = calib.calibrate(c[:2000], r[:2000], y[:2000], c[2000:], r[2000:], y[2000:], method="temperature")
    assert result.temperature == pytest.approx(4.0, rel=0.15)
    assert result.after.ece < 0.5 * result.before.ece
    assert result.after.nll < result.before.nll
    assert result.after.log_likelihood == pytest.approx(-result.after.nll)
    # already calibrated scores keep T ~ 1
    c1, r1, y1 = _miscalibrated(seed=1, overconfidence=1.0)
    assert calib.fit_temperature(c1 - r1, y1) == pytest.approx(1.0, rel=0.15)


def test_logistic_calibration_lowers_nll_and_soft_targets():
    c, r, y = _miscalibrated(seed=2)
    result = calib.calibrate(c, r, y, method="logistic")
    assert set(result.logistic) == {"eta3", "eta4"} and result.logistic["eta4"] > 0
    assert result.after.nll < result.before.nll
    # soft targets (vote shares): the fitted probabilities approach the shares
    d = np.linspace(-3, 3, 200)
    share = 1 / (1 + np.exp(-d / 2.0))
    t = calib.fit_temperature(d, share)
    assert t == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ValueError, match="valid methods"):
        calib.calibrate(c, r, y, method="isotonic")


def test_calibration_is_stored_with_the_model(tmp_path, tiny_pipe):
    from dinalrm_align.tiny import tiny_reward_model

    rm = tiny_reward_model(tiny_pipe.transformer, seed=3)
    c, r, y = _miscalibrated(n=400)
    result = calib.calibrate(c, r, y, method="temperature")
    calib.apply_to_model(rm, result)
    a, b = torch.tensor([2.0]), torch.tensor([0.0])
    assert float(rm.preference_probability(a, b)) == pytest.approx(float(torch.sigmoid(a / result.temperature)))
    rm.save_pretrained(tmp_path / "m")
    loaded = LatentRewardModel.from_pretrained(tmp_path / "m", transformer=tiny_pipe.transformer)
    assert loaded.config.normalization.temperature == pytest.approx(result.temperature)
    logi = calib.calibrate(c, r, y, method="logistic")
    calib.apply_to_model(loaded, logi)
    loaded.save_pretrained(tmp_path / "m2")
    again = LatentRewardModel.from_pretrained(tmp_path / "m2", transformer=tiny_pipe.transformer)
    assert again.config.logistic == pytest.approx(logi.logistic)


# ---------------------------------------------------------------------------------------- eval-rm
def test_eval_rm_command_writes_report_plots_and_calibrated_model(tmp_path, tiny_pipe):
    from dinalrm_align.rm_training.cli import eval_main

    pairs = _pairs(tmp_path / "pairs", n=16)
    img_dir = tmp_path / "ranked"
    img_dir.mkdir()
    rows = []
    for s in range(2):
        names = []
        for k in range(3):
            name = f"s{s}_{k}.png"
            Image.new("RGB", (32, 32), (80 * k, 40, 200 - 60 * k)).save(img_dir / name)
            names.append(name)
        rows.append({"prompt": "a red cube", "images": names, "ranks": [1, 2, 2]})
    (img_dir / "sets.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "report"
    code = eval_main([
        "--model", "tiny", "--pipeline", "tiny", "--pairs", str(pairs), "--ranked", str(img_dir / "sets.jsonl"),
        "--out", str(out), "--us", "0.3,0.5", "--ensemble", "0.2,0.5", "--max-sequence-length", "8",
        "--calibration-u", "0.3", "--save-calibrated", str(tmp_path / "calibrated"), "--quiet",
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["pairs"]["accuracy"]) == {"0.3", "0.5", "ensemble"}
    assert report["ranked"]["accuracy"]["0.3"]["total"] == 6  # 2 sets x 3 pairs, ties included
    assert report["ranked"]["accuracy"]["0.3"]["correct"] <= 4
    cal = report["calibration"]
    assert cal["level"] == "0.3" and cal["num_fit_pairs"] == 8 and cal["num_eval_pairs"] == 8
    assert {"nll", "log_likelihood", "ece", "bins"} <= set(cal["before"])
    assert (out / "accuracy_vs_u.png").is_file() and (out / "reliability.png").is_file()
    loaded = LatentRewardModel.from_pretrained(tmp_path / "calibrated", transformer=tiny_pipe.transformer)
    assert loaded.config.normalization.temperature == pytest.approx(cal["temperature"])
    assert eval_main(["--model", "tiny", "--pipeline", "tiny", "--out", str(out)]) == 2
