"""Typed recipe loading, overrides, and the preflight rejection of bad input (no models loaded)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from dinalrm_align.trainer.config import (
    TrainConfig,
    apply_overrides,
    config_to_dict,
    load_dataclass,
    load_train_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_refl.yaml"
PROMPTS = REPO / "recipes" / "prompts" / "tiny_prompts.txt"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)


def tiny(*overrides: str, run_dir: Path | None = None) -> TrainConfig:
    extra = [f"data.prompts={PROMPTS}"] + ([f"run_dir={run_dir}"] if run_dir else [])
    return load_train_config(TINY, [*extra, *overrides])


# ---------------------------------------------------------------------------------- generic loader


@dataclass
class Inner:
    depth: int = 1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    rate: float = 0.5
    flag: bool = False
    tags: list[str] = field(default_factory=list)
    pair: tuple[float, float] = (0.0, 1.0)
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_load_dataclass_nested_and_types():
    obj = load_dataclass(
        Outer,
        {
            "name": "x",
            "rate": "1e-4",
            "flag": True,
            "tags": ["a"],
            "pair": [1, 2],
            "inner": {"depth": 3, "mode": "b"},
        },
    )
    assert obj.rate == pytest.approx(1e-4) and obj.pair == (1.0, 2.0) and obj.inner == Inner(3, "b")
    assert obj.maybe is None


@pytest.mark.parametrize(
    "mapping, message",
    [
        (
            {"name": "x", "nmae": 1},
            "unknown key 'nmae' in section 'root' (did you mean 'name'?); valid keys: name, rate",
        ),
        ({"name": "x", "inner": {"dept": 2}}, "unknown key 'dept' in section 'inner'"),
        ({"name": "x", "rate": "fast"}, "key 'rate' expects float"),
        ({"name": "x", "flag": 1}, "key 'flag' expects bool"),
        ({"name": "x", "inner": {"mode": "c"}}, "key 'inner.mode' must be one of ['a', 'b']"),
        ({"name": "x", "pair": [1]}, "key 'pair' expects 2 items"),
        ({"name": "x", "tags": "a"}, "key 'tags' expects a list"),
        ({"rate": 1.0}, "missing required key 'name'"),
    ],
)
def test_load_dataclass_errors(mapping, message):
    with pytest.raises(ValueError) as err:
        load_dataclass(Outer, mapping)
    assert message in str(err.value)


def test_overrides_parse_yaml_scalars():
    out = apply_overrides({"a": {"b": 1}}, ["a.b=2.5", "a.c=true", "d.e=[1, 2]", "f=null", "g=hello"])
    assert out == {"a": {"b": 2.5, "c": True}, "d": {"e": [1, 2]}, "f": None, "g": "hello"}
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ValueError, match="is not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


# ---------------------------------------------------------------------------------- the recipe


def test_tiny_recipe_loads_typed():
    cfg = tiny("train.max_steps=5", "optim.lr=1e-4", "algorithm.k_min=5")
    assert type(cfg.algorithm).__name__ == "ReFLConfig"
    assert cfg.algorithm.k_min == 5 and cfg.algorithm.k_max == 7
    assert cfg.train.max_steps == 5 and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.lora.target_modules[0] == "attn.to_q"


def test_real_recipes_load():
    for name in ("refl_sd35m.yaml", "refl_sd35m_1gpu.yaml"):
        cfg = load_train_config(REPO / "recipes" / name)
        assert cfg.model.lora.r == 32 and cfg.model.lora.alpha == 64
        assert (cfg.algorithm.k_min, cfg.algorithm.k_max) == (30, 39)
        assert cfg.sampling.num_steps == 40 and cfg.reward.u == pytest.approx(0.4)
    assert load_train_config(REPO / "recipes" / "refl_sd35m.yaml").train.accumulation_for(8) == 4


def test_saved_config_round_trips(tmp_path):
    cfg = tiny("train.max_steps=7")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_train_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["algorithm"]["name"] == "refl"


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainig.max_steps=3", "unknown key 'trainig' in section 'root'"),
        ("train.max_stepz=3", "unknown key 'max_stepz' in section 'train'"),
        ("train.max_steps=many", "key 'train.max_steps' expects int"),
        ("train.mixed_precision=fp8", "key 'train.mixed_precision' must be one of"),
        ("sampling.resolution=520", "multiple of 16"),
        ("algorithm.k_min=9", "k_min <= algorithm.k_max"),
        ("algorithm.name=nope", "unknown algorithm 'nope'; valid algorithms: refl"),
        ("algorithm.fm_lambda=0.5", "needs algorithm.fm_dataset"),
        ("model.finetune=full", None),
    ],
)
def test_bad_recipe_keys_rejected(override, message):
    if message is None:  # share_base_weights needs a LoRA policy
        with pytest.raises(ValueError, match="share_base_weights"):
            tiny(override, "reward.share_base_weights=true")
        return
    with pytest.raises(ValueError) as err:
        tiny(override)
    assert message in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError) as err:
        tiny("trainig.max_steps=3")
    text = str(err.value)
    assert "unknown key 'trainig' in section 'root'" in text
    assert "valid keys: run_dir, seed, algorithm, model" in text


# ---------------------------------------------------------------------------------- preflight


def preflight(cfg: TrainConfig):
    from dinalrm_align.trainer.loop import Trainer

    return Trainer(cfg).preflight()


def test_preflight_ok(tmp_path):
    pre = preflight(tiny(run_dir=tmp_path))
    assert len(pre.eval_prompts) == 4 and len(pre.train_prompts) == 12
    assert not set(pre.eval_prompts) & set(pre.train_prompts)
    assert pre.accumulation == 1 and pre.resume_from is None


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        preflight(tiny(f"data.prompts={tmp_path / 'nope.txt'}", run_dir=tmp_path))


def test_empty_prompt_set(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="is empty"):
        preflight(tiny(f"data.prompts={empty}", run_dir=tmp_path))


def test_jsonl_prompts_and_missing_field(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a red cube"}\n{"prompt": "a blue ball"}\n{"prompt": "a cat"}\n')
    pre = preflight(tiny(f"data.prompts={good}", "data.num_eval_prompts=1", run_dir=tmp_path))
    assert len(pre.train_prompts) == 2
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"text": "a red cube"}\n')
    with pytest.raises(ValueError, match="has no field 'prompt'"):
        preflight(tiny(f"data.prompts={bad}", run_dir=tmp_path))


def test_batch_not_divisible_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="not divisible across processes"):
        preflight(tiny("train.global_batch_size=8", "train.batch_size=2", run_dir=tmp_path))


def test_resume_from_non_checkpoint(tmp_path):
    folder = tmp_path / "not_a_checkpoint"
    folder.mkdir()
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        preflight(tiny(f"checkpoint.resume={folder}", run_dir=tmp_path))
    with pytest.raises(FileNotFoundError, match="resume checkpoint not found"):
        preflight(tiny(f"checkpoint.resume={tmp_path / 'missing'}", run_dir=tmp_path))
    assert preflight(tiny("checkpoint.resume=latest", run_dir=tmp_path)).resume_from is None


def test_k_range_beyond_schedule(tmp_path):
    with pytest.raises(ValueError, match="must be < sampling.num_steps"):
        preflight(tiny("algorithm.k_max=8", run_dir=tmp_path))


def test_share_base_weights_refused_under_zero3(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="ZeRO-3"):
        preflight(tiny("reward.share_base_weights=true", run_dir=tmp_path))


def test_bad_proxy_reward_import(tmp_path):
    with pytest.raises(ValueError, match="cannot import module"):
        preflight(tiny("eval.proxy_rewards=[{target: 'no_such_module_xyz:fn'}]", run_dir=tmp_path))


# ---------------------------------------------------------------------------------- CLI


def test_cli_reports_errors_and_prints_config(tmp_path, capsys):
    from dinalrm_align.trainer.cli import main

    assert main([str(TINY), "--set", "trainig.max_steps=3"]) == 2
    assert "unknown key 'trainig'" in capsys.readouterr().err
    assert (
        main([str(TINY), "--set", f"data.prompts={PROMPTS}", "--run-dir", str(tmp_path), "--print-config"])
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run_dir"] == str(tmp_path) and printed["algorithm"]["k_max"] == 7
    assert main([str(TINY), "--set", f"data.prompts={PROMPTS}", "--run-dir", str(tmp_path), "--check"]) == 0
    assert "12 training prompts, 4 eval prompts" in capsys.readouterr().out


def test_train_config_fields_documented():
    doc = (REPO / "docs" / "training.md").read_text()
    for section in dataclasses.fields(TrainConfig):
        assert f"`{section.name}" in doc, section.name
