"""Shared fixtures: tiny offline models are built once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the tiny models are dispatch-bound: one thread is faster, and CPUs are shared

TINY_PROMPTS = ["a red cube", "a blue ball", "a green tree", "a yellow car"]
TINY_SEQ_LEN = 16


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny SD3.5-style pipeline (shared: do not modify it in tests; build your own if needed)."""
    from dinalrm_align.tiny import tiny_sd3_pipeline

    return tiny_sd3_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_rm(tiny_pipe):
    """A tiny randomly initialised reward model on the tiny pipeline's transformer (frozen, eval)."""
    from dinalrm_align.tiny import tiny_reward_model

    return tiny_reward_model(tiny_pipe.transformer, seed=0)


@pytest.fixture(scope="session")
def tiny_text(tiny_pipe):
    """(prompts, prompt_embeds (4, 77+16, 32), pooled (4, 64)) for TINY_PROMPTS."""
    from dinalrm_align.reward_model.text import encode_prompts

    pe, pooled = encode_prompts(tiny_pipe, TINY_PROMPTS, max_sequence_length=TINY_SEQ_LEN)
    return TINY_PROMPTS, pe, pooled


@pytest.fixture
def fresh_trainer_state(monkeypatch):
    """For tests that build a Trainer: one process, offline, one torch thread (the tiny models are faster on one
    thread, and CPUs are shared); accelerate's process-wide singletons are reset afterwards."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
