"""Prompt sources, the held-out eval split, a resumable distributed prompt sampler, and
(latent, prompt) datasets for regularisers.

Prompt sources: a ``.txt`` file (one prompt per line, blank lines and ``#`` comments skipped), a
``.jsonl`` file (one object per line with a ``column`` field), or ``hub:NAME`` (a Hugging Face
dataset; needs the ``datasets`` package).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def load_prompts(source: str, format: str = "auto", column: str = "prompt", split: str = "train") -> list[str]:
    """Read prompts from ``source``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown format, a jsonl line without ``column``, or no prompts at all.
    """
    if not source:
        raise ValueError("no prompt source given (data.prompts is empty)")
    fmt = format
    if fmt == "auto":
        if source.startswith("hub:"):
            fmt = "hub"
        elif source.endswith(".jsonl"):
            fmt = "jsonl"
        elif source.endswith(".txt"):
            fmt = "txt"
        else:
            raise ValueError(
                f"cannot tell the format of prompt source {source!r}: use a .txt / .jsonl file, "
                "'hub:NAME', or set data.format"
            )
    if fmt == "hub":
        prompts = _load_hub(source.removeprefix("hub:"), column, split)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path} (data.prompts / data.eval_prompts)")
        prompts = _load_jsonl(path, column) if fmt == "jsonl" else _load_txt(path)
    if not prompts:
        raise ValueError(f"prompt set {source!r} is empty")
    return prompts


def _load_txt(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _load_jsonl(path: Path, column: str) -> list[str]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict) or column not in row:
            raise ValueError(f"{path}:{number} has no field {column!r} (data.column)")
        value = row[column]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{number} field {column!r} must be a string, got {type(value).__name__}")
        if value.strip():
            prompts.append(value.strip())
    return prompts


def _load_hub(name: str, column: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("hub prompt sources need the 'datasets' package: pip install datasets") from exc
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (connection, missing split, ...)
        raise FileNotFoundError(
            f"could not load hub dataset {name!r} (split {split!r}): {exc}. With HF_HUB_OFFLINE=1 only cached "
            "datasets load."
        ) from exc
    if column not in ds.column_names:
        raise ValueError(f"hub dataset {name!r} has no column {column!r}; columns: {', '.join(ds.column_names)}")
    return [str(p).strip() for p in ds[column] if str(p).strip()]


def split_eval(
    prompts: Sequence[str], num_eval: int, seed: int, eval_prompts: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """``(train, eval)`` prompts.

    With ``eval_prompts`` the first ``num_eval`` of them are used and ``prompts`` stay whole;
    otherwise ``num_eval`` prompts are held out of ``prompts`` by a seeded shuffle.
    """
    prompts = list(prompts)
    if eval_prompts is not None:
        return prompts, list(eval_prompts)[:num_eval]
    if num_eval == 0:
        return prompts, []
    if num_eval >= len(prompts):
        raise ValueError(
            f"cannot hold out {num_eval} eval prompts from {len(prompts)} prompts: lower data.num_eval_prompts "
            "or give data.eval_prompts"
        )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    held = set(order[:num_eval])
    eval_set = [prompts[i] for i in sorted(held)]
    train = [p for i, p in enumerate(prompts) if i not in held]
    return train, eval_set


class PromptSampler:
    """Infinite, resumable, distributed stream of prompt batches.

    The stream is the concatenation of seeded permutations of ``prompts`` (one per epoch). Each call
    of :meth:`next_batch` consumes one global batch of ``batch_size * num_processes`` prompts; process
    ``rank`` gets its own contiguous ``batch_size`` slice, so processes see different prompts. The
    whole state is the stream position (identical on every process).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        batch_size: int,
        *,
        num_processes: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not prompts:
            raise ValueError("the training prompt set is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_processes:
            raise ValueError(f"rank {rank} out of range for {num_processes} processes")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def epoch(self) -> int:
        return self.position // len(self.prompts)

    @property
    def epoch_progress(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self.position / len(self.prompts)

    def _index(self, j: int) -> int:
        epoch, offset = divmod(j, len(self.prompts))
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(len(self.prompts), generator=g).tolist()
            else:
                self._perm = list(range(len(self.prompts)))
            self._perm_epoch = epoch
        return self._perm[offset]

    def next_batch(self) -> list[str]:
        start = self.position + self.rank * self.batch_size
        batch = [self.prompts[self._index(j)] for j in range(start, start + self.batch_size)]
        self.position += self.batch_size * self.num_processes
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_prompts"]) != len(self.prompts):
            raise ValueError(
                f"checkpoint was written with {state['num_prompts']} training prompts, this run has "
                f"{len(self.prompts)}: resume with the same prompt set"
            )
        self.position = int(state["position"])
        self.seed = int(state["seed"])


# ----------------------------------------------------------------------------------------------
# (latent, prompt) datasets, e.g. for the flow-matching regulariser
# ----------------------------------------------------------------------------------------------


def save_latent_dataset(path: str | os.PathLike, latents: torch.Tensor, prompts: Sequence[str]) -> Path:
    """Write clean SD3-normalised ``latents`` (N, C, h, w) and their N prompts to one safetensors file."""
    from safetensors.torch import save_file

    if latents.ndim != 4 or latents.shape[0] != len(prompts):
        raise ValueError(f"need latents (N, C, h, w) with N == len(prompts); got {tuple(latents.shape)}, {len(prompts)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.detach().cpu().float().contiguous()}, str(path), metadata={"prompts": json.dumps(list(prompts))})
    return path


def load_latent_dataset(path: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """Inverse of :func:`save_latent_dataset` -> ``(latents (N, C, h, w) float32, prompts)``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent dataset not found: {path}")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if "latents" not in fh.keys() or "prompts" not in meta:
            raise ValueError(f"{path} is not a latent dataset (needs a 'latents' tensor and 'prompts' metadata)")
        latents = fh.get_tensor("latents").float()
    prompts = json.loads(meta["prompts"])
    if latents.ndim != 4 or latents.shape[0] != len(prompts) or latents.shape[0] == 0:
        raise ValueError(f"{path}: latents {tuple(latents.shape)} do not match {len(prompts)} prompts")
    return latents, prompts
