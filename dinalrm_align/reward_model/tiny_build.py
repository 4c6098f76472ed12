"""Tiny random reward models (offline, for tests, the demo and first contact): ``from_pretrained("tiny")``.

A tiny reward model keeps a strict subset of its tiny pipeline's blocks, with two taps, a rank-4 LoRA and
a small head (see :data:`dinalrm_align.tiny_pipelines.TINY_REWARD_SECTIONS`). With ``randomize_zero_init``
the zero-initialised layers (FiLM outputs, value gates, LoRA ``B``) get small random values so that every
part of the model influences the score (tests of gradients and checkpoint round trips).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["build_tiny_reward_model"]


def build_tiny_reward_model(
    cls: Any,
    backbone: str = "sd3",
    transformer: torch.nn.Module | None = None,
    *,
    seed: int = 0,
    scheduler_config: Mapping[str, Any] | None = None,
    share_base_weights: bool = False,
    randomize_zero_init: bool = True,
    **overrides: Any,
) -> Any:
    """A random tiny ``cls`` (a ``LatentRewardModel``) on ``transformer`` (default: the tiny pipeline's,
    whose scheduler config then defines the sigma table). Deterministic given ``seed``."""
    from dinalrm_align.backbones.registry import get_adapter
    from dinalrm_align.tiny_pipelines import tiny_pipeline, tiny_reward_model_config

    adapter = get_adapter(backbone)
    if transformer is None:
        pipe = tiny_pipeline(adapter.name, seed=seed)
        transformer = pipe.transformer
        scheduler_config = dict(pipe.scheduler.config) if scheduler_config is None else scheduler_config
    elif not adapter.matches(transformer):
        raise ValueError(f"a tiny {adapter.name} reward model needs a {adapter.transformer_class_name}, "
                         f"got a {type(transformer).__name__}")
    config = tiny_reward_model_config(adapter.name, **overrides)
    g_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed + 1)
        rm = cls.from_config(config, transformer=transformer, scheduler_config=scheduler_config,
                             share_base_weights=share_base_weights)
        if randomize_zero_init:
            with torch.no_grad():
                for name, p in rm.named_parameters():
                    trainable_part = name.startswith("reward_head.") or "lora_" in name
                    if trainable_part and p.dim() > 0 and torch.count_nonzero(p) == 0:
                        p.normal_(0.0, 0.05)
    finally:
        torch.random.set_rng_state(g_state)
    return rm.eval()
