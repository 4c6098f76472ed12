"""Trainer faults on a toy algorithm plugged in by import path (a linear regression: fast, real trainer):
divergence (TrainingDiverged, exit code 3, the last good checkpoints kept, retries), checkpoint rotation,
``latest``, interrupted saves, corrupt / unsafe / foreign checkpoints, recipe changes on resume, and a
metrics file without duplicate rows after a resume."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml

from dinalrm_align.algorithms.base import Algorithm, BuildResult, Preflight
from dinalrm_align.trainer.sections import AlgorithmConfig, RunConfig

TOY = "test_trainer_faults:ToyRegression"
DIM = 4


@dataclass
class ToyConfig(AlgorithmConfig):
    """``algorithm`` section of the toy: ``nan_at`` lists the train_step calls (1-based) whose loss is NaN."""

    name: str = TOY
    nan_at: list[int] = field(default_factory=list)
    nan_from: int | None = None
    data_file: str | None = None


class CounterStream:
    """Seeded batches ``(8, DIM)``; the position is the whole state."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.position = 0

    def next_batch(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
        self.position += 1
        return torch.randn(8, DIM, generator=g)

    @property
    def epoch_progress(self) -> float:
        return self.position / 10

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class ToyRegression(Algorithm):
    """Fit ``y = sum(x)`` with a linear layer; NaN losses on request."""

    name: ClassVar[str] = "toy"
    config_class: ClassVar[type[AlgorithmConfig]] = ToyConfig
    recipe_class: ClassVar[type[RunConfig]] = RunConfig
    config: ToyConfig

    def preflight(self, recipe: RunConfig, world_size: int) -> Preflight:
        data = Path(self.config.data_file).read_text() if self.config.data_file else "toy"
        return Preflight(world_size, recipe.train.accumulation_for(world_size), "toy regression", data)

    def build(self, run: Any) -> BuildResult:
        torch.manual_seed(run.config.seed)
        self.run = run
        self.calls = 0
        module = torch.nn.Linear(DIM, 1)
        return BuildResult(module, list(module.parameters()), CounterStream(run.config.seed))

    def setup(self, run: Any, model: torch.nn.Module) -> None:
        self.model = model

    def train_step(self, batch: torch.Tensor) -> dict[str, Any]:
        self.calls += 1
        batch = batch.to(self.run.device)
        with self.run.accumulate(self.model):
            loss = ((self.model(batch) - batch.sum(dim=1, keepdim=True)) ** 2).mean()
            nan_from = self.config.nan_from
            if self.calls in self.config.nan_at or (nan_from is not None and self.calls >= nan_from):
                loss = loss * float("nan")
            self.run.backward(loss)
        return {"loss": loss.detach(), "reward": -loss.detach()}

    def save_final(self, out_dir: Path, trainable_state: dict[str, torch.Tensor]) -> str:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state, str(out_dir / "toy.safetensors"))
        return "toy safetensors"

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for handler in list(root.handlers):  # the CLI installs its own handler on a captured stream
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def recipe(run_dir: Path, **algorithm: Any) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "seed": 3,
        "algorithm": {"name": TOY, **algorithm},
        "optim": {"lr": 0.05, "weight_decay": 0.0},
        "train": {"max_steps": 6, "batch_size": 8, "mixed_precision": "no"},
        "ema": {"decay": 0.9},
        "checkpoint": {"every": 2, "keep_last": 2},
        "tracking": {"log_with": "none"},
    }


def make(run_dir: Path, *overrides: str, **algorithm: Any):
    from dinalrm_align.trainer.loop import Trainer
    from dinalrm_align.trainer.recipe import load_recipe

    return Trainer(load_recipe(recipe(run_dir, **algorithm), overrides), progress=False)


def train(run_dir: Path, *overrides: str, **algorithm: Any):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    trainer = make(run_dir, *overrides, **algorithm)
    trainer.train()
    return trainer


def steps_of(run_dir: Path) -> list[int]:
    from dinalrm_align.trainer.checkpointing import list_checkpoints

    return [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir / "checkpoints")]


def rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the timing / memory columns (which differ between runs)."""
    from dinalrm_align.trainer.tracking import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(run_dir)]


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}


# ---------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("log_every", [1, 4])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoints(tmp_path, log_every):
    """A NaN loss at update 5 (checkpoints every update, two kept): TrainingDiverged names step 5 and the loss,
    whether the divergence is seen at a log step or only by the check before the next checkpoint; no
    checkpoint at or after step 5 exists, and the two before it are complete and loadable."""
    from dinalrm_align.errors import TrainingDiverged
    from dinalrm_align.trainer.checkpointing import CheckpointError, verify_checkpoint

    trainer = make(tmp_path, "checkpoint.every=1", f"train.log_every={log_every}", nan_at=[5])
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    assert (err.value.step, err.value.quantity) == (5, "loss")
    assert "non-finite loss at step 5" in str(err.value) and "\n" not in str(err.value)
    assert steps_of(tmp_path) == [3, 4]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert not list((tmp_path / "checkpoints").glob(".tmp_*")) and not (tmp_path / "final").exists()
    for step in (3, 4):
        marker = verify_checkpoint(tmp_path / "checkpoints" / f"step_{step:06d}", 1)
        assert marker["step"] == step
    with pytest.raises(CheckpointError, match=r"algorithm.nan_at: '\[5\]' -> '\[\]'"):
        make(tmp_path, "checkpoint.resume=latest", nan_at=[]).setup()
    fixed = train(tmp_path, "checkpoint.resume=latest", "checkpoint.allow_recipe_change=true", nan_at=[])
    assert fixed.state.resumed_from_step == 4 and fixed.step == 6 and (tmp_path / "final").is_dir()


def test_nan_loss_with_retries_skips_one_update(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dinalrm_align")
    trainer = make(tmp_path, "train.max_retries=2", "checkpoint.every=0", nan_at=[3])
    summary = trainer.train()
    assert summary.steps == 6 and trainer.state.retries == 0
    assert trainer.algorithm.calls == 7 and trainer.data.position == 7  # one batch was skipped
    assert all(bool(torch.isfinite(p).all()) for p in weights(trainer).values())
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert any("skipped (retry 1/2)" in r.getMessage() for r in caplog.records)
    # a NaN that persists exhausts the retries: the step after the last good one is named
    from dinalrm_align.errors import TrainingDiverged

    again = make(tmp_path / "persist", "train.max_retries=2", "checkpoint.every=1", nan_from=4)
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 4"):
        again.train()
    assert again.algorithm.calls == 6 and steps_of(tmp_path / "persist") == [2, 3]


def test_cli_exit_code_3_on_divergence(tmp_path, capsys):
    from dinalrm_align.algorithms.registry import ALGORITHMS, register_algorithm
    from dinalrm_align.trainer.cli import main

    register_algorithm("toy_regression", TOY)
    try:
        data = recipe(tmp_path / "run", nan_at=[3])
        data["algorithm"]["name"] = "toy_regression"  # a registered name
        path = tmp_path / "toy.yaml"
        path.write_text(yaml.safe_dump(data))
        code = main([str(path), "-q", "checkpoint.every=1"])
    finally:
        ALGORITHMS.pop("toy_regression", None)
    out, err = capsys.readouterr()
    assert code == 3
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("dinalrm-align train: error: training diverged: "), err
    assert "non-finite loss at step 3" in lines[0] and "Traceback" not in err
    assert steps_of(tmp_path / "run") == [1, 2]


# ---------------------------------------------------------------------------------- checkpoints


def test_rotation_latest_and_interrupted_saves(tmp_path):
    from dinalrm_align.trainer.checkpointing import MARKER, read_marker, resolve_checkpoint_spec

    train(tmp_path, "checkpoint.every=1", "checkpoint.keep_last=3")
    root = tmp_path / "checkpoints"
    assert steps_of(tmp_path) == [4, 5, 6]
    assert (root / "latest").read_text() == "step_000006\n"
    newest = root / "step_000006"
    marker = read_marker(newest)
    assert marker["step"] == 6 and marker["num_processes"] == 1 and marker["format_version"] == 2
    names = set(marker["files"])
    assert {"trainable.safetensors", "algorithm_rank00000.pt", "optimizer.bin", "scheduler.bin",
            "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= names
    assert all((newest / n).stat().st_size == size for n, size in marker["files"].items())
    assert MARKER not in names and not list(root.glob(".tmp_*"))
    # an interrupted save of step 7 (even one that got as far as its marker) is never a checkpoint
    stale = root / ".tmp_step_000007"
    shutil.copytree(newest, stale)
    marker7 = {**marker, "step": 7}
    (stale / MARKER).write_text(json.dumps(marker7))
    assert [p.name for p in resolve_checkpoint_spec("latest", tmp_path)] == ["step_000006", "step_000005", "step_000004"]
    resumed = make(tmp_path, "checkpoint.resume=latest", "train.max_steps=7", "checkpoint.every=1",
                   "checkpoint.keep_last=3")
    resumed.setup()
    assert resumed.step == 6
    resumed.train()
    assert steps_of(tmp_path) == [5, 6, 7] and not stale.exists()  # the next save cleared it
    assert read_marker(root / "step_000007")["step"] == 7


def test_resume_equals_uninterrupted_and_metrics_have_no_duplicate_rows(tmp_path):
    """A run killed after update 5 (last checkpoint at 4) and resumed gives the uninterrupted run's weights,
    EMA and metrics rows bit for bit; metrics.jsonl is cut back to step 4 before logging again."""
    full = train(tmp_path / "full")
    train(tmp_path / "split", "train.max_steps=5")  # checkpoints 2, 4; update 5 is logged, then "killed"
    assert [r["step"] for r in rows(tmp_path / "split")] == [1, 2, 3, 4, 5]
    resumed = train(tmp_path / "split", "checkpoint.resume=latest")  # train.max_steps may change
    assert resumed.state.resumed_from_step == 4
    got, expected = rows(tmp_path / "split"), rows(tmp_path / "full")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert got == expected
    for name, value in weights(full).items():
        assert torch.equal(weights(resumed)[name], value), name
    for a, b in zip(resumed.ema.model.shadow_params, full.ema.model.shadow_params):
        assert torch.equal(a, b)
    assert resumed.algorithm.calls == full.algorithm.calls == 6


@pytest.mark.parametrize("damage", ["truncate", "delete_trainable", "delete_rng_state"])
def test_corrupt_newest_checkpoint_falls_back(tmp_path, caplog, damage):
    from dinalrm_align.trainer.checkpointing import CheckpointError

    train(tmp_path, "train.max_steps=4")  # checkpoints 2 and 4
    newest = tmp_path / "checkpoints" / "step_000004"
    if damage == "truncate":
        file = newest / "optimizer.bin"
        file.write_bytes(file.read_bytes()[:100])
    elif damage == "delete_trainable":
        (newest / "trainable.safetensors").unlink()
    else:
        (newest / "random_states_0.pkl").unlink()
    caplog.set_level(logging.WARNING, logger="dinalrm_align")
    trainer = make(tmp_path, "checkpoint.resume=latest")
    trainer.setup()
    assert trainer.step == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipping checkpoint" in m and "step_000004" in m and "falling back" in m for m in warnings), warnings
    with pytest.raises(CheckpointError, match="step_000004 is (corrupt|incomplete)"):
        make(tmp_path / "other", f"checkpoint.resume={newest}").setup()  # an explicit bad path is an error


def test_only_checkpoint_corrupt_and_foreign_process_count(tmp_path):
    from dinalrm_align.trainer.checkpointing import MARKER, CheckpointError

    train(tmp_path, "train.max_steps=2")
    only = tmp_path / "checkpoints" / "step_000002"
    marker = json.loads((only / MARKER).read_text())
    (only / MARKER).write_text(json.dumps({**marker, "num_processes": 2}))
    with pytest.raises(CheckpointError, match="written by 2 processes; this launch has 1"):
        make(tmp_path, "checkpoint.resume=latest").setup()
    (only / MARKER).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        make(tmp_path, f"checkpoint.resume={only}").setup()


class _Evil:
    """Unpickling this runs a shell command (what a weights_only load must refuse)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


@pytest.mark.parametrize("fix_size", [True, False])
def test_unsafe_pickle_is_refused_without_running_it(tmp_path, caplog, fix_size):
    from dinalrm_align.trainer.checkpointing import MARKER, CheckpointError

    train(tmp_path, "train.max_steps=4")
    newest = tmp_path / "checkpoints" / "step_000004"
    flag = tmp_path / "pwned"
    target = newest / "custom_checkpoint_0.pkl"
    torch.save({"step": _Evil(flag)}, target)
    if fix_size:  # a crafted checkpoint whose marker agrees with the file sizes
        marker = json.loads((newest / MARKER).read_text())
        marker["files"]["custom_checkpoint_0.pkl"] = target.stat().st_size
        (newest / MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError) as err:
        make(tmp_path / "other", f"checkpoint.resume={newest}").setup()
    expected = "does not load safely" if fix_size else "is corrupt"
    assert expected in str(err.value) and "custom_checkpoint_0.pkl" in str(err.value)
    caplog.set_level(logging.WARNING, logger="dinalrm_align")
    trainer = make(tmp_path, "checkpoint.resume=latest")
    trainer.setup()
    assert trainer.step == 2
    assert any("step_000004" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not flag.exists(), "the pickle was executed"


def test_recipe_and_data_changes_on_resume(tmp_path, caplog):
    from dinalrm_align.trainer.checkpointing import CheckpointError

    data = tmp_path / "data.txt"
    data.write_text("one\n")
    run = tmp_path / "run"
    train(run, "train.max_steps=2", data_file=str(data))
    with pytest.raises(CheckpointError) as err:
        make(run, "checkpoint.resume=latest", "optim.lr=0.5", data_file=str(data)).setup()
    text = str(err.value)
    assert "optim.lr: 0.05 -> 0.5" in text and "allow_recipe_change" in text and "\n" not in text
    caplog.set_level(logging.WARNING, logger="dinalrm_align")
    allowed = make(run, "checkpoint.resume=latest", "optim.lr=0.5", "checkpoint.allow_recipe_change=true",
                   data_file=str(data))
    allowed.setup()
    assert allowed.step == 2 and any("optim.lr" in r.getMessage() and "resuming anyway" in r.getMessage()
                                     for r in caplog.records)
    longer = make(run, "checkpoint.resume=latest", "train.max_steps=9", "train.log_every=3", data_file=str(data))
    longer.setup()  # the run length and logging may change
    assert longer.step == 2
    data.write_text("two\n")  # same recipe, other data
    with pytest.raises(CheckpointError, match="the training data differs"):
        make(run, "checkpoint.resume=latest", data_file=str(data)).setup()


# ---------------------------------------------------------------------------------- the real algorithms

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "recipes" / "prompts" / "tiny_prompts.txt"


def _poison_at(trainer, call: int, parameters) -> None:
    """Set ``parameters`` to NaN right before the algorithm's ``call``-th train_step (mid-run)."""
    original = trainer.algorithm.train_step
    calls = {"n": 0}

    def train_step(batch):
        calls["n"] += 1
        if calls["n"] == call:
            with torch.no_grad():
                for p in parameters():
                    p.fill_(float("nan"))
        return original(batch)

    trainer.algorithm.train_step = train_step


@pytest.mark.parametrize("algorithm", ["refl", "grpo"])
def test_nan_mid_run_in_real_algorithms(tmp_path, monkeypatch, algorithm):
    """ReFL: a policy LoRA weight becomes NaN before update 3. GRPO: the reward model's head becomes NaN
    before the second epoch (update 3). Both stop with TrainingDiverged naming step 3; checkpoints 1 and 2
    stay, none is written at or after step 3."""
    from dinalrm_align.errors import TrainingDiverged
    from dinalrm_align.trainer.config import load_train_config
    from dinalrm_align.trainer.loop import Trainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = [f"data.prompts={PROMPTS}", f"run_dir={tmp_path}", "train.max_steps=4", "checkpoint.every=1",
              "checkpoint.keep_last=3", "eval.at_start=false", "eval.at_end=false", "eval.every=0",
              "sampling.num_steps=4", "eval.num_steps=4"]
    if algorithm == "refl":
        overrides = [*common, "algorithm.k_min=2", "algorithm.k_max=3", "train.batch_size=2"]
        cfg = load_train_config(REPO / "recipes" / "tiny_refl.yaml", overrides)
    else:
        overrides = [*common, "sampling.resolution=32", "algorithm.sde_window_size=1", "algorithm.sde_window_range=[0,2]",
                     "train.batch_size=4"]
        cfg = load_train_config(REPO / "recipes" / "tiny_grpo.yaml", overrides)
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    ctx = trainer.algorithm.ctx
    if algorithm == "refl":
        _poison_at(trainer, 3, lambda: [p for n, p in ctx.transformer.named_parameters() if "lora_B" in n][:1])
        quantity = "loss"
    else:
        _poison_at(trainer, 3, lambda: [p for n, p in ctx.reward.model.named_parameters() if "head" in n][:1])
        quantity = "reward"
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    assert (err.value.step, err.value.quantity) == (3, quantity), str(err.value)
    assert steps_of(tmp_path) == [1, 2] and not (tmp_path / "final").exists()


def test_fresh_run_into_a_used_run_dir_is_refused_before_any_work(tmp_path):
    """A fresh start where an earlier run left checkpoints would mix with them (and rotation, ordering by step,
    would delete the new run's lower-numbered checkpoints): refused at preflight; resuming is allowed."""
    from dinalrm_align.trainer.checkpointing import CheckpointError

    train(tmp_path)
    assert steps_of(tmp_path) == [4, 6]
    with pytest.raises(CheckpointError, match="already holds checkpoints of an earlier run.*--resume latest"):
        make(tmp_path).preflight()
    assert steps_of(tmp_path) == [4, 6]
    resumed = train(tmp_path, "checkpoint.resume=latest", "train.max_steps=8")
    assert resumed.step == 8 and steps_of(tmp_path) == [6, 8]


def test_a_failed_save_leaves_no_partial_folder_and_latest_untouched(tmp_path, monkeypatch):
    """A save that fails half-way (e.g. a full disk) raises, removes its temporary folder and keeps `latest`."""
    from dinalrm_align.trainer.metrics import MetricBuffer

    trainer = make(tmp_path, "checkpoint.every=2")
    trainer.setup()
    assert trainer._update(MetricBuffer())
    trainer.state.step = 2
    good = trainer.checkpoints.save(2)
    manager = trainer.checkpoints

    def disk_full(folder):
        (folder / "partial.bin").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    trainer.state.step = 4
    with pytest.raises(OSError, match="No space left"):
        manager.save(4, extra=disk_full)
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == good.name
    assert steps_of(tmp_path) == [2]


def test_final_weights_are_published_atomically_with_ordinary_permissions(tmp_path):
    """`final/` appears complete (staged, then renamed; an earlier one replaced only after), nothing staged
    stays behind, and folders are not private (a plain mkdir's mode)."""
    umask = os.umask(0)
    os.umask(umask)
    train(tmp_path)
    first = (tmp_path / "final" / "toy.safetensors").read_bytes()
    resumed = train(tmp_path, "checkpoint.resume=latest", "train.max_steps=8")
    assert resumed.step == 8
    assert (tmp_path / "final" / "toy.safetensors").read_bytes() != first
    assert not list(tmp_path.glob(".tmp_*")) and not list(tmp_path.glob(".old_*"))
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 8
    for folder in (tmp_path / "final", *(p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder


def test_hacking_monitor_stop_rule_and_unmonitored_proxies():
    """The rule fires when the learned reward rises while a watched proxy falls; a proxy with monitor: false is
    logged (its gap too) but never stops the run."""
    from dinalrm_align.trainer.evaluation import HackingMonitor

    learned = [[0.0, 0.2], [1.0, 1.2], [2.0, 2.2]]
    golden = [[1.0, 1.2], [0.5, 0.7], [0.0, 0.2]]
    steady = [[1.0, 1.2], [1.0, 1.2], [1.1, 1.3]]
    monitor = HackingMonitor(margin=0.5)
    assert monitor.update(learned[0], {"golden": golden[0], "pick": steady[0]})[1] is None
    metrics, reason = monitor.update(learned[1], {"golden": golden[1], "pick": steady[1]})
    assert reason is not None and "golden" in reason
    assert metrics["eval/hacking_gap/golden"] > metrics["eval/hacking_gap/pick"] > 0
    quiet = HackingMonitor(margin=0.5)
    for step in range(3):
        metrics, reason = quiet.update(learned[step], {"golden": golden[step], "pick": steady[step]}, watched={"pick"})
        assert reason is None and "eval/hacking_gap/golden" in metrics
