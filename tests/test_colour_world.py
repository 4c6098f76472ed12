"""The colour world: golden reward, optics, pair construction, determinism, recipes, and a reduced end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dinalrm_align.demo.colour_world import main
from dinalrm_align.demo.config import ColourWorldConfig
from dinalrm_align.demo.pairs import label_probability
from dinalrm_align.demo.recipes import refl_recipe, rm_recipe
from dinalrm_align.demo.stages import build_pairs_stage, build_world
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


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="backbone"):
        ColourWorldConfig(backbone="sdxl")
    with pytest.raises(ValueError, match="rm_steps"):
        ColourWorldConfig(rm_steps=0)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("cw")
    cfg = ColourWorldConfig.quick(str(out))
    cfg.progress = False
    return cfg, out, build_world(cfg, out)


def test_optics_tints_move_the_decoded_colour(small_world):
    from dinalrm_align.demo.world import decode

    cfg, _, world = small_world
    optics, pipe = world.optics, world.pipe
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
    cfg, _, world = small_world
    pairs = build_pairs_stage(cfg, world)
    again_world = build_world(cfg, tmp_path)
    again = build_pairs_stage(cfg, again_world)
    assert world.eval_prompts == again_world.eval_prompts
    assert world.optics.directions == again_world.optics.directions
    a, b = pairs["train"]["pairs"].records, again["train"]["pairs"].records
    assert len(a) == len(b) > 0
    assert all(x.prompt == y.prompt and (x.chosen == y.chosen).all() for x, y in zip(a[:20], b[:20]))
    stats = pairs["train"]["stats"]
    assert stats["label_agreement_with_golden"] > 0.9 and stats["mean_golden_gap"] >= cfg.min_gap
    assert not set(world.eval_prompts) & set(world.train_prompts)
    assert len(list((tmp_path / "pairs" / "train").glob("*.parquet"))) >= 1


def test_recipes_load_and_match_tiny_rm_yaml(small_world):
    from pathlib import Path

    import yaml

    from dinalrm_align.trainer.recipe import load_recipe

    cfg, out, world = small_world
    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "tiny_rm.yaml").read_text())
    demo = rm_recipe(ColourWorldConfig(), Path("runs/colour_world"), {
        "train": {"folder": "runs/colour_world/pairs/train"}, "eval": {"folder": "runs/colour_world/pairs/eval"}})
    assert demo["algorithm"] == recipe["algorithm"] == "reward_model"
    for section in ("model", "loss"):
        for key, value in recipe[section].items():
            assert demo[section][key] == value, (section, key)
    for key in ("lr", "weight_decay"):
        assert demo["optim"][key] == recipe["optim"][key]
    refl = load_recipe(refl_recipe(cfg, out, world, "tiny", eval={"every": 5}))
    assert refl.algorithm.name == "refl" and refl.eval.every == 5 and refl.eval.proxy_rewards[0].name == "golden"
    assert refl.algorithm.k_max == cfg.num_steps - 1 and refl.model.pretrained == "tiny:0"


def test_demo_reduced_size_end_to_end(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    for key in ("curves", "before_after"):  # the pictures exist, load, and their paths are printed
        path = report["pictures"][key]
        assert path in printed
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 150
    assert str(out / "report.json") in printed and "measured time" in printed
    timings = report["timings"]
    assert set(timings) == {"world", "pairs", "reward_model", "align", "report", "total"}
    assert all(v["wall_s"] > 0 and v["cpu_s"] > 0 for v in timings.values())
    assert timings["total"]["wall_s"] >= max(v["wall_s"] for k, v in timings.items() if k != "total")
    acc = report["reward_model"]["accuracy_per_u"]
    assert set(acc) == {"0.4", "0.7", "ensemble"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert f"u=0.4 {100 * acc['0.4']:.1f} %" in printed
    held, al = report["held_out"], report["alignment"]
    assert len(held["golden_before_per_prompt"]) == len(held["prompts"]) == 4
    assert 0.0 <= held["golden_before"] <= 1.0 and 0.0 <= held["golden_after"] <= 1.0
    assert held["golden_gain"] == pytest.approx(held["golden_after"] - held["golden_before"])
    # the before/after samples are the trainer's own evaluations at step 0 and at the end (same weights, noise)
    curve = al["eval_curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == al["steps"] == 4
    assert held["golden_before"] == pytest.approx(curve[0]["golden"], abs=1e-4)
    assert held["golden_after"] == pytest.approx(curve[-1]["golden"], abs=1e-4)
    assert held["learned_before"] == pytest.approx(curve[0]["reward_raw"], abs=1e-3)
    assert held["learned_after"] == pytest.approx(curve[-1]["reward_raw"], abs=1e-3)
    # the mechanism that holds even at this size: ReFL raises the learned reward on held-out prompts
    assert held["learned_after"] > held["learned_before"]
    from dinalrm_align.reward_model.model import LatentRewardModel
    from dinalrm_align.tiny import tiny_sd3_pipeline

    rm = LatentRewardModel.from_pretrained(report["reward_model"]["folder"], transformer=tiny_sd3_pipeline(0).transformer)
    assert rm.config.num_transformer_layers == 2
    assert (out / "refl" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_demo_bad_arguments_give_one_line_errors(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path / "x"), "--quiet", "--rm-steps", "0"]) == 2
    assert "dinalrm-align demo: error: rm_steps must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("backbone", ["flux", "zimage"])
def test_demo_runs_on_the_other_backbones(tmp_path, capsys, backbone):
    out = tmp_path / backbone
    assert main(["--quick", "--backbone", backbone, "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["world"]["backbone"] == backbone
    held, curve = report["held_out"], report["alignment"]["eval_curve"]
    assert held["golden_before"] == pytest.approx(curve[0]["golden"], abs=1e-4)
    assert held["golden_after"] == pytest.approx(curve[-1]["golden"], abs=1e-4)
    assert held["learned_after"] == pytest.approx(curve[-1]["reward_raw"], abs=1e-3)
    config = json.loads((out / "reward_model" / "final" / "config.json").read_text())
    assert config["model"]["backbone"] == backbone
