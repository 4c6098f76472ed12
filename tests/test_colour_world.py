"""The colour world: golden reward, optics, pair construction, determinism, and a reduced end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dinalrm_align.demo.colour_world import ColourWorldConfig, main, rm_train_config, stage_pairs, stage_world
from dinalrm_align.demo.pairs import label_probability
from dinalrm_align.demo.world import COLOURS, ColourOptics, colour_word, make_prompts, measure_colour


def _identity_optics() -> ColourOptics:
    eye = torch.eye(3)
    return ColourOptics(
        directions=torch.zeros(3, 16).tolist(), mean=[0.5, 0.5, 0.5], whitening=eye.tolist(), tint_scale=1.0,
        singular_values=[1.0, 1.0, 1.0],
    )


def test_golden_reward_is_colour_distance():
    optics = _identity_optics()  # calibrated colour == measured colour
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1.0
    grey = torch.full((1, 3, 8, 8), 0.5)
    g = optics.golden(torch.cat([red, grey]), ["a red cube", "a blue ball", "a red cube"])
    assert g[0] == pytest.approx(1.0)
    assert g[1] == pytest.approx(1.0 - math.sqrt(2.0) / math.sqrt(3.0))  # red image, blue prompt
    assert g[2] == pytest.approx(1.0 - math.sqrt(0.75) / math.sqrt(3.0))
    torch.testing.assert_close(measure_colour(grey), torch.full((1, 3), 0.5))
    assert colour_word("a magenta hat") == "magenta" and len(make_prompts()) == len(COLOURS) * 14
    with pytest.raises(ValueError, match="colour-world prompt"):
        colour_word("a photo of a cat")


def test_label_probability_is_thurstone():
    assert label_probability(0.0, 0.02) == pytest.approx(0.5)
    assert label_probability(0.05, 0.02) == pytest.approx(0.5 * (1 + math.erf(0.05 / 0.04)))
    assert label_probability(-0.2, 0.02) < 1e-6 and label_probability(0.1, 0.0) == 1.0


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("cw")
    cfg = ColourWorldConfig.quick(str(out))
    cfg.progress = False
    world = stage_world(cfg, out)
    return cfg, out, world


def test_optics_tints_move_the_decoded_colour(small_world):
    from dinalrm_align.demo.world import decode

    cfg, _, world = small_world
    optics, pipe = world["optics"], world["pipe"]
    s = optics.singular_values
    assert s[0] >= s[1] >= s[2] > 0
    z = torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    base = optics.calibrate(measure_colour(decode(pipe, z)))
    tint = torch.tensor([[2.0, 0.0, 0.0]]).expand(4, 3)
    moved = optics.calibrate(measure_colour(decode(pipe, z + optics.tint(tint))))
    assert (moved - base).norm(dim=1).mean() > 0.2  # a strong tint is clearly visible after calibration
    d = optics.distractors(4, (16, 16, 16), 0.5, 0.3, torch.Generator().manual_seed(1))
    changed = optics.calibrate(measure_colour(decode(pipe, z + d)))
    assert (changed - base).norm(dim=1).mean() < 0.5 * (moved - base).norm(dim=1).mean()


def test_world_and_pairs_are_deterministic(small_world, tmp_path):
    cfg, out, world = small_world
    pairs = stage_pairs(cfg, out, world)
    again_world = stage_world(cfg, tmp_path)
    again = stage_pairs(cfg, tmp_path, again_world)
    assert world["eval_prompts"] == again_world["eval_prompts"]
    assert world["optics"].directions == again_world["optics"].directions
    a, b = pairs["train"]["pairs"].records, again["train"]["pairs"].records
    assert len(a) == len(b) > 0
    assert all(x.prompt == y.prompt and (x.chosen == y.chosen).all() for x, y in zip(a[:20], b[:20]))
    stats = pairs["train"]["stats"]
    assert stats["label_agreement_with_golden"] > 0.9 and stats["mean_golden_gap"] >= cfg.min_gap
    assert not set(world["eval_prompts"]) & set(world["train_prompts"])


def test_tiny_rm_recipe_matches_the_demo_recipe():
    from pathlib import Path

    import yaml

    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "tiny_rm.yaml").read_text())
    demo = rm_train_config(ColourWorldConfig(), Path("runs/colour_world"), {
        "train": {"folder": "runs/colour_world/pairs/train"}, "eval": {"folder": "runs/colour_world/pairs/eval"}})
    for section in ("model", "loss"):
        for key, value in recipe[section].items():
            assert demo[section][key] == value, (section, key)
    for key in ("lr", "weight_decay"):
        assert demo["optim"][key] == recipe["optim"][key]
    assert demo["train"]["max_steps"] == recipe["train"]["max_steps"]


def test_demo_reduced_size_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out), "--quiet", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "colour world finished" in printed and str(out / "colour_world.png") in printed
    report = json.loads((out / "report.json").read_text())
    acc = report["reward_model"]["accuracy_per_u"]
    assert set(acc) == {"0.4", "0.7", "ensemble"} and all(0.0 <= v <= 1.0 for v in acc.values())
    held = report["held_out"]
    assert len(held["golden_before_per_prompt"]) == len(held["prompts"]) == 4
    assert 0.0 <= held["golden_before"] <= 1.0 and 0.0 <= held["golden_after"] <= 1.0
    assert held["golden_gain"] == pytest.approx(held["golden_after"] - held["golden_before"])
    curve = report["alignment"]["eval_curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == report["alignment"]["steps"]
    assert (out / "colour_world.png").stat().st_size > 10_000
    from dinalrm_align.reward_model.model import LatentRewardModel
    from dinalrm_align.testing import tiny_sd3_pipeline

    LatentRewardModel.from_pretrained(report["reward_model"]["folder"], transformer=tiny_sd3_pipeline(0).transformer)
    assert (out / "refl" / "final" / "pytorch_lora_weights.safetensors").is_file()
