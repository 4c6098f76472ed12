"""Recipe loading with OmegaConf (YAML + dotlist overrides), its one-line errors, the preflight rejection of
bad input (no models loaded) and the ``dinalrm-align train`` command line."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from dinalrm_align.trainer.config import TrainConfig, load_train_config
from dinalrm_align.trainer.recipe import (
    config_to_dict,
    flatten_dict,
    load_recipe,
    parse_overrides,
    read_yaml,
    recipe_fingerprint,
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
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):  # the CLI installs its own handler on a captured stream
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def tiny(*overrides: str, run_dir: Path | None = None) -> TrainConfig:
    extra = [f"data.prompts={PROMPTS}"] + ([f"run_dir={run_dir}"] if run_dir else [])
    return load_train_config(TINY, [*extra, *overrides])


# ---------------------------------------------------------------------------------- the loader


def test_mapping_recipe_nested_and_types():
    cfg = load_train_config(
        {
            "algorithm": {"name": "refl", "k_min": 1, "k_max": 3},
            "optim": {"lr": "1e-4", "betas": [0.8, 0.9], "max_grad_norm": None},
            "train": {"allow_tf32": False, "num_threads": 1},
            "tracking": {"tags": ["a", "b"], "log_with": "none"},
            "model": {"pretrained": "tiny", "lora": {"r": 4}},
            "data": {"prompts": str(PROMPTS)},
            "eval": {"proxy_rewards": [{"target": "pkg.mod:fn", "kwargs": {"scale": 2}}]},
        }
    )
    assert isinstance(cfg, TrainConfig) and type(cfg.algorithm).__name__ == "ReFLConfig"
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert tuple(cfg.optim.betas) == (0.8, 0.9) and cfg.optim.max_grad_norm is None
    assert cfg.train.allow_tf32 is False and cfg.tracking.tags == ["a", "b"]
    assert cfg.model.lora.r == 4 and cfg.model.lora.alpha is None  # null: the backbone's default
    (proxy,) = cfg.eval.proxy_rewards
    assert type(proxy).__name__ == "ProxyRewardConfig" and proxy.name == "fn" and proxy.kwargs == {"scale": 2}
    assert (cfg.algorithm.k_min, cfg.algorithm.k_max) == (1, 3) and cfg.train.max_steps == 150  # defaults kept


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainig.max_steps=3", "unknown key 'trainig' in the recipe's top level (did you mean 'train'?); valid keys: "
                                "run_dir, seed, algorithm, optim, train"),
        ("train.max_stepz=3", "unknown key 'train.max_stepz' in train (did you mean 'max_steps'?); valid keys: "
                              "max_steps, batch_size"),
        ("algorithm.kmin=3", "unknown key 'algorithm.kmin' in algorithm (did you mean 'k_min'?); valid keys: name, k_min"),
        ("model.lora.rank=4", "unknown key 'model.lora.rank' in model.lora"),
        ("eval.proxy_rewards=[{targt: 'a:b'}]", "unknown key 'eval.proxy_rewards[0].targt' in eval.proxy_rewards[0] "
                                                "(did you mean 'target'?)"),
        ("train.max_steps=many", "key 'train.max_steps': Value 'many' of type 'str' could not be converted to Integer"),
        ("optim.lr=fast", "key 'optim.lr'"),
        ("seed=1.5", "key 'seed'"),
        ("train.allow_tf32=maybe", "key 'train.allow_tf32': Value 'maybe' is not a valid bool"),
        ("train.mixed_precision=fp8", "key 'train.mixed_precision': Invalid value 'fp8', expected one of ['no', 'fp16'"),
        ("optim.betas=[0.9]", "key 'optim.betas' expects 2 items, got 1"),
        ("tracking.tags=a", "key 'tracking.tags'"),
        ("model.lora=3", "section 'model.lora' must be a mapping of its keys, got int 3"),
        ("data.prompts=null", "key 'data.prompts'"),
        ("algorithm.k_min=9", "k_min <= algorithm.k_max"),
        ("algorithm.name=nope", "unknown algorithm 'nope'; valid algorithms: refl, grpo, reward_model"),
        ("algorithm.fm_lambda=0.5", "needs algorithm.fm_dataset"),
        ("ema.decay=1.5", "ema.decay < 1"),
        ("train.batch_size=0", "'train.batch_size' must be > 0, got 0"),
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
    text = str(err.value)
    assert message in text
    assert "\n" not in text, text  # one line, never OmegaConf's multi-line report


def test_missing_required_key():
    with pytest.raises(ValueError, match="missing required key 'data.prompts'"):
        load_train_config({"model": {"pretrained": "tiny"}})


def test_overrides_parse_yaml_scalars():
    out = parse_overrides(["a.b=2.5", "a.c=true", "d.e=[1, 2]", "f=null", "g=hello"])
    assert out == {"a": {"b": 2.5, "c": True}, "d": {"e": [1, 2]}, "f": None, "g": "hello"}
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ValueError, match="key.sub=value"):
            parse_overrides([bad])
    with pytest.raises(ValueError, match="key 'seed': .*could not be converted to Integer"):  # a scalar as a section
        tiny("seed.x=2")
    with pytest.raises(ValueError, match="section 'train' must be a mapping"):
        tiny("train=5")


def test_read_yaml_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe not found: .*nope.yaml"):
        read_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1, 2\nseed: 3\n")
    with pytest.raises(ValueError, match=r"recipe .*bad.yaml is not valid YAML \(line \d+\)") as err:
        read_yaml(bad)
    assert "\n" not in str(err.value)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must contain a mapping at the top level, got list"):
        load_train_config(scalar)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(empty) == {}


# ---------------------------------------------------------------------------------- the recipes


def test_tiny_recipe_loads_typed():
    from dinalrm_align.backbones.registry import get_adapter
    from dinalrm_align.trainer.config import LoraSettings
    from dinalrm_align.trainer.policy import lora_config

    cfg = tiny("train.max_steps=5", "optim.lr=1e-4", "algorithm.k_min=5")
    assert type(cfg.algorithm).__name__ == "ReFLConfig"
    assert cfg.algorithm.k_min == 5 and cfg.algorithm.k_max == 7
    assert cfg.train.max_steps == 5 and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.lora.target_modules == ["default"]
    lora = lora_config(cfg.model.lora, get_adapter("sd3"))
    assert (lora.r, lora.lora_alpha) == (8, 16) and "attn.to_q" in lora.target_modules
    default = lora_config(LoraSettings(), get_adapter("sd3"))  # r / alpha null -> the backbone's 32 / 64
    assert (default.r, default.lora_alpha) == (32, 64)
    grpo = load_train_config(REPO / "recipes" / "tiny_grpo.yaml", [f"data.prompts={PROMPTS}"])
    assert type(grpo.algorithm).__name__ == "GRPOConfig" and grpo.algorithm.group_size == 4


def test_real_recipes_load():
    for name in ("refl_sd35m.yaml", "refl_sd35m_1gpu.yaml"):
        cfg = load_train_config(REPO / "recipes" / name)
        assert cfg.model.lora.r == 32 and cfg.model.lora.alpha == 64
        assert (cfg.algorithm.k_min, cfg.algorithm.k_max) == (30, 39)
        assert cfg.sampling.num_steps == 40 and cfg.reward.u == pytest.approx(0.4)
        assert Path(cfg.data.prompts).is_file()  # relative to the recipe's folder
    assert load_train_config(REPO / "recipes" / "refl_sd35m.yaml").train.accumulation_for(8) == 4


def test_prompt_paths_resolve_from_cwd_then_recipe_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(TINY)  # recipes say prompts/tiny_prompts.txt
    assert Path(cfg.data.prompts) == PROMPTS
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "tiny_prompts.txt").write_text("a local prompt\n")
    assert load_train_config(TINY).data.prompts == "prompts/tiny_prompts.txt"  # the working directory first


def test_saved_config_round_trips(tmp_path):
    cfg = tiny("train.max_steps=7", "eval.proxy_rewards=[{name: p, target: 'a.b:c', inputs: latents}]")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_train_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["algorithm"]["name"] == "refl"
    assert recipe_fingerprint(again) == recipe_fingerprint(cfg)


def test_fingerprint_ignores_resumable_keys():
    base = recipe_fingerprint(tiny())
    for same in ("train.max_steps=99", "run_dir=elsewhere", "checkpoint.every=3", "tracking.log_with=tensorboard",
                 "eval.every=7", "train.log_every=5"):
        assert recipe_fingerprint(tiny(same)) == base, same
    for changed in ("optim.lr=0.5", "seed=3", "algorithm.k_min=5", "train.batch_size=3"):
        assert recipe_fingerprint(tiny(changed)) != base, changed
    flat = flatten_dict({"a": {"b": 1, "c": [1, 2], "d": None}})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "a.d": "null"}


def test_load_recipe_default_algorithm():
    cfg = load_recipe({"data": {"prompts": str(PROMPTS)}, "algorithm": "grpo"}, default_algorithm="refl")
    assert cfg.algorithm.name == "grpo" and type(cfg.algorithm).__name__ == "GRPOConfig"
    assert load_recipe({"data": {"prompts": str(PROMPTS)}}).algorithm.name == "refl"
    with pytest.raises(ValueError, match="section 'algorithm' must be a mapping"):
        load_recipe({"data": {"prompts": str(PROMPTS)}, "algorithm": 3})


# ---------------------------------------------------------------------------------- preflight


def preflight(cfg: TrainConfig):
    from dinalrm_align.trainer.loop import Trainer

    return Trainer(cfg).preflight()


def test_preflight_ok(tmp_path):
    pre = preflight(tiny(run_dir=tmp_path))
    train, held_out = pre.info["train_prompts"], pre.info["eval_prompts"]
    assert len(held_out) == 4 and len(train) == 12
    assert not set(held_out) & set(train)
    assert pre.accumulation == 1 and pre.world_size == 1
    assert pre.summary == "12 training prompts, 4 eval prompts" and len(pre.data_fingerprint) == 16
    other = preflight(tiny("seed=5", run_dir=tmp_path))  # another held-out split: other data
    assert other.data_fingerprint != pre.data_fingerprint


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
    assert len(pre.info["train_prompts"]) == 2
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
    preflight(tiny("checkpoint.resume=latest", run_dir=tmp_path))  # nothing to resume yet: a fresh start


def test_resolution_must_fit_the_backbone(tmp_path):
    """The tiny SD3 policy (VAE factor 2 x patch size 2): 62 px is refused before any model is loaded."""
    with pytest.raises(ValueError, match=r"sampling.resolution 62 does not fit the sd3 policy: it must be a multiple of 4"):
        preflight(tiny("sampling.resolution=62", run_dir=tmp_path))
    preflight(tiny("sampling.resolution=36", run_dir=tmp_path))


def test_k_range_beyond_schedule(tmp_path):
    with pytest.raises(ValueError, match="must be < sampling.num_steps"):
        preflight(tiny("algorithm.k_max=8", run_dir=tmp_path))


def test_share_base_weights_refused_under_zero3(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="cannot be used with zero3"):
        preflight(tiny("reward.share_base_weights=true", run_dir=tmp_path))


def test_bad_proxy_reward_import(tmp_path):
    with pytest.raises(ValueError, match="cannot import module"):
        preflight(tiny("eval.proxy_rewards=[{target: 'no_such_module_xyz:fn'}]", run_dir=tmp_path))


def test_reward_family_mismatch_needs_the_bridge(tmp_path):
    with pytest.raises(ValueError, match="reward.bridge: pixels"):
        preflight(tiny("reward.model=tiny-flux", run_dir=tmp_path))
    with pytest.raises(FileNotFoundError, match="reward model folder not found"):
        preflight(tiny(f"reward.model={tmp_path / 'no_rm'}", run_dir=tmp_path))


# ---------------------------------------------------------------------------------- CLI


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from dinalrm_align.trainer.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinalrm-align train: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--set", "trainig.max_steps=3"], ["unknown key 'trainig'", "did you mean 'train'", "valid keys: run_dir"]),
        (["train.max_steps=many"], ["key 'train.max_steps'", "Integer"]),
        (["train.max_stepz=3"], ["unknown key 'train.max_stepz'", "did you mean 'max_steps'"]),
        (["--set", "data.prompts=/no/such/prompts.txt", "--check"], ["prompt file not found: /no/such/prompts.txt"]),
        (["--resume", "/no/such/checkpoint", "--check"], ["resume checkpoint not found"]),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(capsys, argv, fragments):
    code, out, err = run_cli(capsys, TINY, *argv)
    assert code == 2 and out == ""
    assert_one_error_line(err, *fragments)


def test_cli_bad_recipe_files(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "nope.yaml")
    assert code == 2
    assert_one_error_line(err, "recipe not found", "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {pretrained: tiny\nseed: [\n")
    code, _, err = run_cli(capsys, bad)
    assert code == 2
    assert_one_error_line(err, "is not valid YAML", "bad.yaml")


def test_cli_overrides_print_config_and_check(tmp_path, capsys):
    code, out, err = run_cli(capsys, TINY, "train.max_steps=10", "--set", f"data.prompts={PROMPTS}",
                             "--set", "optim.lr=0.25", "--run-dir", tmp_path, "--print-config")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["run_dir"] == str(tmp_path) and printed["algorithm"]["k_max"] == 7
    assert printed["train"]["max_steps"] == 10 and printed["optim"]["lr"] == 0.25  # positional and --set
    assert printed["data"]["prompts"] == str(PROMPTS)
    code, out, err = run_cli(capsys, TINY, "--resume", "latest", "--allow-recipe-change", "--print-config")
    printed = yaml.safe_load(out)
    assert code == 0 and printed["checkpoint"] == {**printed["checkpoint"], "resume": "latest",
                                                   "allow_recipe_change": True}
    code, out, err = run_cli(capsys, TINY, "--set", f"data.prompts={PROMPTS}", "--run-dir", tmp_path, "--check", "-q")
    assert code == 0, err
    assert out.startswith("ok: 12 training prompts, 4 eval prompts; 1 process(es), gradient accumulation 1")
    assert not (tmp_path / "checkpoints").exists()  # --check loads and writes nothing


def test_recipe_reference_is_generated_from_the_code_and_up_to_date():
    from dinalrm_align.trainer.reference import field_docs, recipe_reference

    doc = (REPO / "docs" / "recipes.md").read_text()
    assert doc == recipe_reference(), "docs/recipes.md is stale: python -m dinalrm_align.trainer.reference > docs/recipes.md"
    for section in dataclasses.fields(TrainConfig):
        assert f"`{section.name}`" in doc, section.name
    # every field of every section (of both recipe kinds) has a description
    import typing

    from dinalrm_align.rm_training.config import RMTrainConfig

    for recipe in (TrainConfig, RMTrainConfig):
        for section in typing.get_type_hints(recipe).values():
            if dataclasses.is_dataclass(section):
                missing = {f.name for f in dataclasses.fields(section)} - set(field_docs(section))
                assert not missing, f"{section.__name__} fields without a description: {sorted(missing)}"
