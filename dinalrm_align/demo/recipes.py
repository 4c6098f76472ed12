"""The colour world's two recipes as mappings for :func:`dinalrm_align.trainer.recipe.load_recipe`:
the reward model (``algorithm: reward_model``, same keys as ``recipes/tiny_rm.yaml``) and ReFL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinalrm_align.demo.config import ColourWorldConfig

__all__ = ["pipeline_id", "refl_recipe", "rm_recipe"]


def pipeline_id(cfg: ColourWorldConfig) -> str:
    """The tiny model id of the demo's backbone and seed (``tiny:0``, ``tiny-flux:0``, ...)."""
    return f"tiny:{cfg.seed}" if cfg.backbone == "sd3" else f"tiny-{cfg.backbone}:{cfg.seed}"


def rm_recipe(cfg: ColourWorldConfig, out: Path, pairs: dict[str, Any], *, run_name: str = "reward_model",
              steps: int | None = None) -> dict[str, Any]:
    """The reward-model recipe: tiny preset (``rm_layers`` blocks, taps at the middle and last), noise-
    calibrated Thurstone loss with u uniform in [0.1, 0.7], LoRA + head, EMA; evaluation is done by the demo."""
    layers = cfg.rm_layers
    taps = [layers // 2, layers] if layers >= 4 else [layers]
    return {
        "run_dir": str(out / run_name),
        "algorithm": "reward_model",
        "seed": cfg.seed,
        "model": {
            "pipeline": pipeline_id(cfg),
            "preset": "tiny",
            "architecture": {"num_transformer_layers": layers, "visual_head_idx": taps, "text_head_idx": taps},
            "max_sequence_length": cfg.max_sequence_length,
            "zero_init_noise": cfg.rm_init_noise,
        },
        "data": {"train": str(pairs["train"]["folder"]), "eval": str(pairs["eval"]["folder"])},
        "loss": {"name": "thurstone", "u_sampler": "uniform", "u_min": 0.1, "u_max": 0.7},
        "optim": {"lr": cfg.rm_lr, "weight_decay": 0.01, "max_grad_norm": 1.0},
        "train": {"max_steps": cfg.rm_steps if steps is None else steps, "batch_size": cfg.rm_batch_size,
                  "mixed_precision": "no", "num_threads": cfg.num_threads, "log_every": 10},
        "ema": {"enabled": True, "decay": cfg.rm_ema_decay, "update_every": 1},
        "checkpoint": {"every": 0},
        "eval": {"every": 0, "at_start": False, "at_end": False},
        "tracking": {"log_with": "none"},
    }


def refl_recipe(cfg: ColourWorldConfig, out: Path, world: Any, rm_dir: str, *, run_name: str = "refl",
                **sections: Any) -> dict[str, Any]:
    """The ReFL recipe: LoRA policy, the learned reward model, the golden reward as an evaluation-only
    proxy on the held-out prompts. ``sections`` deep-update the mapping (e.g. ``eval={"every": 10}``)."""
    k = cfg.num_steps
    recipe: dict[str, Any] = {
        "run_dir": str(out / run_name),
        "seed": cfg.seed,
        "algorithm": {"name": "refl", "k_min": max(0, k - cfg.refl_last_steps), "k_max": k - 1, "rollout_cfg": False},
        "model": {"pretrained": pipeline_id(cfg), "finetune": "lora",
                  "lora": {"r": cfg.refl_lora_rank, "alpha": 2 * cfg.refl_lora_rank,
                           **({"target_modules": cfg.refl_targets} if cfg.refl_targets else {})}},
        "reward": {"model": rm_dir, "u": cfg.refl_u, "n_noise": cfg.refl_n_noise},
        "sampling": {"resolution": cfg.resolution, "num_steps": k, "guidance_scale": 1.0,
                     "max_sequence_length": cfg.max_sequence_length},
        "data": {"prompts": str(out / "world" / "train_prompts.txt"),
                 "eval_prompts": str(out / "world" / "eval_prompts.txt"), "num_eval_prompts": len(world.eval_prompts)},
        "optim": {"lr": cfg.refl_lr, "weight_decay": cfg.refl_weight_decay, "max_grad_norm": 1.0},
        "train": {"max_steps": cfg.refl_steps, "batch_size": cfg.refl_batch_size, "mixed_precision": "no",
                  "num_threads": cfg.num_threads, "log_every": 1},
        "ema": {"enabled": True, "decay": cfg.refl_ema_decay, "update_every": 1},
        "checkpoint": {"every": 0},
        "eval": {
            "every": cfg.refl_eval_every, "at_start": True, "at_end": True, "num_steps": k, "guidance_scale": 1.0,
            "batch_size": 64, "seed": 4321 + cfg.seed, "images": False,
            "proxy_rewards": [{"name": "golden", "target": "dinalrm_align.demo.world:golden_reward_factory",
                               "factory": True, "kwargs": {"optics": str(world.optics_path)}}],
        },
        "tracking": {"log_with": "none"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe
