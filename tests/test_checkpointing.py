"""Checkpoints: RNG state, atomic layout, rotation, weights_only loading, EMA, the prompt sampler,
and the key property: a resumed tiny run equals the uninterrupted one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dinalrm_align.trainer.checkpointing import (
    CheckpointManager,
    capture_rng_state,
    list_checkpoints,
    resolve_resume,
    restore_rng_state,
)
from dinalrm_align.trainer.data import PromptSampler
from dinalrm_align.trainer.ema import EMA

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_refl.yaml"
PROMPTS = REPO / "recipes" / "prompts" / "tiny_prompts.txt"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_rng_state_round_trip(tmp_path):
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(3)  # move on
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_manager_atomic_layout_and_rotation(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(
            step,
            weights={"w": torch.full((2,), float(step))},
            shared={"data": {"position": step}},
            per_rank={"rng": capture_rng_state()},
            meta={"note": "x"},
        )
    (tmp_path / "checkpoints" / ".tmp_step_000004").mkdir()  # an interrupted save
    found = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in found] == ["step_000002", "step_000003"]
    assert resolve_resume("latest", tmp_path) == found[-1]
    state = manager.load(found[-1])
    assert state["step"] == 3 and state["meta"] == {"note": "x"}
    assert torch.equal(state["weights"]["w"], torch.full((2,), 3.0))
    assert state["shared"]["data"] == {"position": 3} and "rng" in state["per_rank"]
    for pt in found[-1].glob("*.pt"):
        torch.load(pt, weights_only=True)
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        manager.load(tmp_path)
    with pytest.raises(ValueError, match="did you mean"):
        resolve_resume(str(tmp_path), tmp_path)


def test_ema_update_swap_and_state():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5, update_every=2)
    p.data.fill_(2.0)
    assert not ema.step(1) and ema.step(2)
    assert torch.allclose(ema.shadow[0], torch.ones(3))
    with ema.swapped():
        assert torch.allclose(p, torch.ones(3))
    assert torch.allclose(p, torch.full((3,), 2.0))
    other = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.5, update_every=2)
    other.load_state_dict(ema.state_dict())
    assert torch.allclose(other.shadow[0], torch.ones(3)) and other.num_updates == 1


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


def _run(tmp: Path, max_steps: int, *extra: str):
    from dinalrm_align.trainer.config import load_train_config
    from dinalrm_align.trainer.loop import Trainer
    from dinalrm_align.trainer.policy import trainable_state_dict

    cfg = load_train_config(
        TINY,
        [
            f"data.prompts={PROMPTS}",
            f"run_dir={tmp}",
            f"train.max_steps={max_steps}",
            "train.batch_size=2",
            "checkpoint.every=2",
            "checkpoint.keep_last=3",
            "eval.at_start=false",
            "eval.at_end=false",
            "eval.every=0",
            "ema.update_every=2",
            *extra,
        ],
    )
    trainer = Trainer(cfg)
    trainer.train()
    weights = trainable_state_dict(trainer.transformer)
    ema = [s.clone() for s in trainer.ema.shadow]
    return trainer.step_losses, weights, ema


def test_resume_equals_uninterrupted(tmp_path):
    full_losses, full_weights, full_ema = _run(tmp_path / "full", 4)
    first_losses, _, _ = _run(tmp_path / "split", 2)
    ckpt = tmp_path / "split" / "checkpoints" / "step_000002"
    assert ckpt.is_dir()
    rest_losses, weights, ema = _run(tmp_path / "split", 4, "checkpoint.resume=latest")
    assert len(full_losses) == 4 and len(first_losses) == 2 and len(rest_losses) == 2
    np.testing.assert_allclose(first_losses + rest_losses, full_losses, rtol=1e-6, atol=1e-7)
    assert weights.keys() == full_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], full_weights[name], rtol=1e-5, atol=1e-7)
    for a, b in zip(ema, full_ema):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for pt in ckpt.glob("*.pt"):
        torch.load(pt, weights_only=True)
