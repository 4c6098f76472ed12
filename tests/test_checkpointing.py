"""Checkpoints and EMA: the checkpoint manager on a real accelerator (layout, RNG states, weights_only
pickles), diffusers' EMAModel behind :class:`EMA`, the prompt sampler, and the key property: a resumed
tiny ReFL run equals the uninterrupted one bit for bit (weights, EMA, metrics rows)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dinalrm_align.trainer.data import PromptSampler
from dinalrm_align.trainer.ema import EMA
from dinalrm_align.trainer.sections import EMAConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_refl.yaml"
PROMPTS = REPO / "recipes" / "prompts" / "tiny_prompts.txt"


pytestmark = pytest.mark.usefixtures("fresh_trainer_state")


class _Counter:
    """Algorithm-state stand-in for the state hooks."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = int(state["value"])


def test_manager_layout_rng_states_and_weights_only(tmp_path):
    """The manager on a plain accelerator: every file of a checkpoint loads with weights_only=True, the
    trainable weights and per-process state come back, and the global RNGs are restored."""
    from safetensors.torch import load_file

    from dinalrm_align.trainer.accelerator import build_accelerator
    from dinalrm_align.trainer.checkpointing import (
        CheckpointManager,
        _safe_globals,
        read_marker,
        resolve_checkpoint_spec,
        verify_checkpoint,
    )
    from dinalrm_align.trainer.state import TrainerState, register_state_hooks

    acc = build_accelerator(mixed_precision="no", gradient_accumulation_steps=1, run_dir=tmp_path)
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen: not part of the checkpoint's trainable weights
    optimizer = torch.optim.AdamW([model.weight], lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    state, algo = TrainerState(), _Counter()
    acc.register_for_checkpointing(state)
    register_state_hooks(acc, model, algo)
    manager = CheckpointManager(tmp_path, acc, keep_last=2, recipe={"optim.lr": 0.1}, recipe_fingerprint="r",
                                data_fingerprint="d")
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state.step, algo.value = 7, 11
    saved_weight = model.weight.detach().clone()
    path = manager.save(7, meta={"note": "x"})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    marker = read_marker(path)
    assert marker["step"] == 7 and marker["meta"] == {"note": "x"} and marker["recipe"] == {"optim.lr": 0.1}
    assert set(load_file(str(path / "trainable.safetensors"))) == {"weight"}
    assert verify_checkpoint(path, 1)["step"] == 7  # sizes, safetensors headers, weights_only pickles
    with torch.serialization.safe_globals(_safe_globals()):  # numpy arrays (RNG states) and accelerate's types
        for file in path.iterdir():
            if file.suffix in (".pkl", ".bin", ".pt"):
                torch.load(file, weights_only=True)
    # move everything on, then resume
    random.random(), np.random.rand(), torch.rand(3)
    with torch.no_grad():
        model.weight.add_(1.0)
    state.step, algo.value = 0, 0
    assert manager.resume(str(path))["step"] == 7
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert torch.equal(model.weight, saved_weight) and state.step == 7 and algo.value == 11
    assert resolve_checkpoint_spec(None, tmp_path) == [] and resolve_checkpoint_spec("latest", tmp_path) == [path]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, acc, keep_last=0)
    with pytest.raises(ValueError, match="did you mean .*step_000007 or 'latest'"):
        resolve_checkpoint_spec(str(tmp_path), tmp_path)  # the run folder, not a checkpoint


# ---------------------------------------------------------------------------------- EMA


def test_ema_is_diffusers_emamodel_with_update_every_swap_and_state(tmp_path):
    from diffusers.training_utils import EMAModel

    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.full((2, 2), 4.0))
    ema = EMA([p, q], EMAConfig(decay=0.5, warmup=False, update_every=2))
    assert isinstance(ema.model, EMAModel)
    p.data.fill_(2.0)
    assert not ema.step(1) and ema.step(2) and ema.num_updates == 1
    torch.testing.assert_close(ema.model.shadow_params[0], torch.full((3,), 2.0))  # first update: decay 0
    p.data.fill_(4.0)
    d = 2 / 11  # no warm-up: (1 + t) / (10 + t) with t = updates - 1 = 1, below the cap 0.5
    assert ema.current_decay() == pytest.approx(d)
    ema.step(4)
    torch.testing.assert_close(ema.model.shadow_params[0], torch.full((3,), d * 2.0 + (1 - d) * 4.0))
    live = [p.detach().clone(), q.detach().clone()]
    with ema.swapped():
        torch.testing.assert_close(p.detach(), torch.full((3,), d * 2.0 + (1 - d) * 4.0))
        p.data.fill_(-1.0)  # evaluation code must not leak into the live weights
    assert torch.equal(p, live[0]) and torch.equal(q, live[1])  # exactly restored
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    other = EMA([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))],
                EMAConfig(decay=0.5, warmup=False, update_every=2))
    other.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert other.num_updates == 2
    for a, b in zip(other.model.shadow_params, ema.model.shadow_params):
        assert torch.equal(a, b)
    other.copy_to()
    torch.testing.assert_close(other.params[0].detach(), torch.full((3,), d * 2.0 + (1 - d) * 4.0))
    with pytest.raises(ValueError, match="EMA state has 2 tensors, the model has 1"):
        EMA([torch.nn.Parameter(torch.zeros(3))], EMAConfig()).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="shape mismatch"):
        EMA([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))],
            EMAConfig()).load_state_dict(ema.state_dict())


def test_default_ema_forgets_the_initial_weights():
    """Defaults (decay 0.99 with warm-up): a scalar that is 1 at the first update and 0 afterwards keeps a
    weight of prod_t decay_t on the 1 after 150 updates, which is below 1e-3 (the warm-up forgets fast)."""
    cfg = EMAConfig()
    assert (cfg.decay, cfg.warmup, cfg.power) == (0.99, True, pytest.approx(2 / 3))
    p = torch.nn.Parameter(torch.ones(()))
    ema = EMA([p], cfg)
    ema.step(1)
    p.data.zero_()
    decays = []
    for step in range(2, 151):
        decays.append(ema.current_decay())
        ema.step(step)
    weight = float(ema.model.shadow_params[0])
    hand = float(np.prod([min(0.99, 1 - (1 + t) ** (-2 / 3)) for t in range(1, 150)]))
    assert weight == pytest.approx(hand, rel=1e-4)
    assert 0 < weight < 1e-3
    assert decays == sorted(decays) and max(decays) <= 0.99  # the decay grows towards its cap
    assert ema.num_updates == 150


# ---------------------------------------------------------------------------------- prompts


def test_prompt_sampler_distributed_and_resumable():
    prompts = [f"p{i}" for i in range(7)]
    ranks = [PromptSampler(prompts, 2, num_processes=2, rank=r, seed=3) for r in range(2)]
    batches = [[s.next_batch() for _ in range(5)] for s in ranks]
    for a, b in zip(*batches):
        assert not set(a) & set(b) or len(set(a) | set(b)) < 4  # disjoint unless an epoch boundary repeats
    seen_first_epoch = batches[0][0] + batches[1][0] + batches[0][1] + batches[1][1]
    assert len(set(seen_first_epoch[:7])) == len(seen_first_epoch[:7])
    fresh = PromptSampler(prompts, 2, num_processes=2, rank=0, seed=3)
    fresh.load_state_dict(ranks[0].state_dict())
    assert fresh.next_batch() == ranks[0].next_batch()
    with pytest.raises(ValueError, match="same prompt set"):
        PromptSampler(prompts[:3], 2).load_state_dict(ranks[0].state_dict())


# ---------------------------------------------------------------------------------- resume == uninterrupted


def _run(tmp: Path, max_steps: int, *extra: str, prompts: Path = PROMPTS):
    from accelerate.state import AcceleratorState, GradientState

    from dinalrm_align.trainer.config import load_train_config
    from dinalrm_align.trainer.loop import Trainer
    from dinalrm_align.trainer.tracking import read_metrics

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = load_train_config(
        TINY,
        [
            f"data.prompts={prompts}",
            f"run_dir={tmp}",
            f"train.max_steps={max_steps}",
            "train.batch_size=2",
            "sampling.num_steps=4",
            "algorithm.k_min=2",
            "algorithm.k_max=3",
            "checkpoint.every=2",
            "checkpoint.keep_last=3",
            "eval.at_start=false",
            "eval.at_end=false",
            "eval.every=0",
            "ema.update_every=2",
            *extra,
        ],
    )
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    weights = trainer._trainable_state()
    ema = [s.clone() for s in trainer.ema.model.shadow_params]
    rows = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(tmp)]
    return trainer, rows, weights, ema


def test_resume_equals_uninterrupted(tmp_path):
    """Killed after update 3 (last checkpoint at 2), resumed: the same weights, EMA and metrics rows as the
    uninterrupted 4-update run; metrics.jsonl holds each step once."""
    from dinalrm_align.trainer.checkpointing import CheckpointError, verify_checkpoint

    prompts = tmp_path / "prompts.txt"
    shutil.copy(PROMPTS, prompts)
    _, full_rows, full_weights, full_ema = _run(tmp_path / "full", 4, prompts=prompts)
    _, first_rows, _, _ = _run(tmp_path / "split", 3, prompts=prompts)
    ckpt = tmp_path / "split" / "checkpoints" / "step_000002"
    assert ckpt.is_dir() and not (tmp_path / "split" / "checkpoints" / "step_000003").exists()
    assert [r["step"] for r in first_rows] == [1, 2, 3]
    trainer, rows, weights, ema = _run(tmp_path / "split", 4, "checkpoint.resume=latest", prompts=prompts)
    assert trainer.state.resumed_from_step == 2
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # row 3 of the killed run was cut, then logged again
    assert rows == full_rows  # losses, rewards, k, sigma_k, grad norms, lr, EMA decay: bit for bit
    assert rows[2]["train/loss"] == first_rows[2]["train/loss"]
    assert weights.keys() == full_weights.keys() and all("lora_" in n for n in weights)
    for name in weights:
        assert torch.equal(weights[name], full_weights[name]), name
    for a, b in zip(ema, full_ema):
        assert torch.equal(a, b)
    assert verify_checkpoint(ckpt, 1)["step"] == 2  # every pickle loads with weights_only=True
    # another prompt set (same file, one prompt changed) is refused on resume
    text = prompts.read_text().splitlines()
    assert text[-1] and not text[-1].startswith("#")
    prompts.write_text("\n".join([*text[:-1], text[-1] + " at dusk"]) + "\n")
    with pytest.raises(CheckpointError, match="the training data differs"):
        _run(tmp_path / "split", 6, "checkpoint.resume=latest", prompts=prompts)
