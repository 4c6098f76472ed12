"""What a checkpoint holds besides accelerate's own state, and the hooks that write and read it.

* :class:`TrainerState` (step, evaluation history): registered with ``register_for_checkpointing``.
* The trainable weights: accelerate would save the prepared module's *whole* state dict (every frozen
  base weight too); the save hook writes only the trainable tensors to ``trainable.safetensors`` and the
  load hook restores them strictly (missing / unexpected names and shape mismatches are errors).
  DeepSpeed and FSDP keep their own shards (no hook involvement).
* The algorithm's per-process state (its random generators, GRPO's rollout buffer) goes to
  ``algorithm_rank00000.pt`` per process: accelerate saves registered objects from the main process only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["TrainerState", "register_state_hooks"]

TRAINABLE_FILE = "trainable.safetensors"


class TrainerState:
    """Step counter and evaluation history (identical on every process)."""

    def __init__(self) -> None:
        self.step = 0
        self.resumed_from_step = 0
        self.retries = 0
        self.eval_before: dict[str, float] = {}
        self.eval_after: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "eval_before": dict(self.eval_before), "eval_after": dict(self.eval_after),
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.eval_before = {str(k): float(v) for k, v in state.get("eval_before", {}).items()}
        self.eval_after = {str(k): float(v) for k, v in state.get("eval_after", {}).items()}
        self.history = [dict(h) for h in state.get("history", [])]


def _algorithm_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"algorithm_rank{rank:05d}.pt"


def register_state_hooks(accelerator: Any, model: torch.nn.Module, algorithm: Any) -> None:
    """Install the save / load pre-hooks described in the module docstring."""
    from safetensors.torch import load_file, save_file

    def trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in accelerator.unwrap_model(module).named_parameters() if p.requires_grad}

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if weights:  # plain / DDP: replace accelerate's full state dict by the trainable tensors
            if accelerator.is_main_process:
                tensors = {n: p.detach().cpu().contiguous() for n, p in trainable(model).items()}
                save_file(tensors, str(Path(output_dir) / TRAINABLE_FILE))
            weights.clear()
        torch.save(algorithm.state_dict(), _algorithm_file(output_dir, accelerator.process_index))

    def load_hook(models: list[Any], input_dir: str) -> None:
        file = Path(input_dir) / TRAINABLE_FILE
        if models and file.is_file():
            state = load_file(str(file))
            for module in list(models):
                params = trainable(module)
                missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
                if missing or unexpected:
                    raise ValueError(
                        f"{file} does not match the trainable parameters: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]} (a checkpoint of another model?)"
                    )
                with torch.no_grad():
                    for name, param in params.items():
                        if tuple(state[name].shape) != tuple(param.shape):
                            raise ValueError(f"{file}: {name} has shape {tuple(state[name].shape)}, the model "
                                             f"{tuple(param.shape)}")
                        param.copy_(state[name].to(param.device, param.dtype))
            models.clear()
        algo_file = _algorithm_file(input_dir, accelerator.process_index)
        algorithm.load_state_dict(torch.load(algo_file, map_location="cpu", weights_only=True))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
