"""Reading and writing reward-model checkpoints.

Released layout (``liuhuohuo/DiNa-LRM-SD35M-12layers``)::

    config.json                  full training config; only ``model`` (+ ``training.add_noise``) matter here
    checkpoint/backbone_lora/    PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    checkpoint/rm_head.pt        torch.save of the head state dict (loaded with weights_only=True)

The project's own layout is the same with ``rm_head.safetensors`` instead of ``rm_head.pt``
(and ``full_model.safetensors`` instead of ``full_model.pt`` for a fully fine-tuned backbone).
Training runs write checkpoints as ``<run>/checkpoints/step_XXXXXX/`` with ``config.json`` at
the run root; pointing :func:`find_config` at such a folder finds the parent's config.

Saving (:func:`save_model`) replaces only the files of this layout (:data:`OWN_FILES`) and keeps
every other file in the folder; a folder holding another kind of checkpoint is refused unless
``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.atomic import staging_dir
from dinalrm_align.reward_model.config import ADAPTER_NAME

CONFIG_NAMES = ("config.json", "config.yaml", "config.yml")
LORA_DIR = "backbone_lora"
PEFT_PREFIX = "base_model.model."


def resolve_model_folder(model_id_or_path: str | Path, revision: str | None = None) -> Path:
    """A local folder as is, otherwise a hub snapshot; a miss is a clear ``FileNotFoundError``."""
    path = Path(model_id_or_path).expanduser()
    if path.is_dir():
        exported = path / "model"  # a checkpoint of `dinalrm-align train-rm`: its model/ is the reward model
        if not any((path / n).is_file() for n in CONFIG_NAMES) and (exported / "config.json").is_file():
            return exported
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; expected a reward-model folder or a Hugging Face repo id")
    name = str(model_id_or_path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"reward-model folder not found: {path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, revision=revision))
    except Exception as exc:  # offline, not found, network, invalid id
        raise FileNotFoundError(
            f"reward model {name!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). With HF_HUB_OFFLINE=1 only models already in the cache load: "
            "download it first (huggingface-cli download ...) or pass a local folder."
        ) from exc


def find_config(folder: Path) -> Path:
    """The reward model's ``config.json`` (or .yaml) in ``folder`` or, for an upstream training checkpoint
    (``<run>/checkpoints/step_N``), its run folder. Other configs (e.g. a training recipe) are skipped."""
    for base in (folder, folder.parent, folder.parent.parent):
        for name in CONFIG_NAMES:
            path = base / name
            if path.is_file() and (base == folder or _is_reward_model_config(path)):
                return path
    raise FileNotFoundError(f"no reward-model config.json (or config.yaml) found in {folder} or its parent folders")


def find_weights_dir(folder: Path) -> Path:
    """``folder/checkpoint`` if present, else ``folder`` itself."""
    sub = folder / "checkpoint"
    return sub if sub.is_dir() else folder


def read_lora_config(weights_dir: Path):
    """The PEFT ``LoraConfig`` stored with the adapter (authoritative for r, alpha, targets)."""
    from peft import LoraConfig

    cfg_file = weights_dir / LORA_DIR / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"missing LoRA adapter config: {cfg_file} (the config says use_lora: true)")
    data = json.loads(cfg_file.read_text())
    data.pop("peft_type", None)
    data.pop("auto_mapping", None)
    data["inference_mode"] = True
    known = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in data.items() if k in known})


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _first_existing(weights_dir: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (weights_dir / name).is_file():
            return weights_dir / name
    raise FileNotFoundError(f"missing {what}: none of {', '.join(names)} found in {weights_dir}")


def _strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: missing keys {missing}; unexpected keys {unexpected}"
        )
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        details = ", ".join(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:8]
        )
        raise ValueError(f"{what} has tensors of the wrong shape: {details}")
    module.load_state_dict(state, strict=True)


def load_lora(model: Any, weights_dir: Path) -> None:
    """Load a PEFT adapter folder (keys ``base_model.model.<module>.lora_X.weight``) into ``rm_lora``."""
    lora_dir = weights_dir / LORA_DIR
    file = _first_existing(
        lora_dir, ("adapter_model.safetensors", "adapter_model.bin"), "LoRA adapter weights"
    )
    raw = _load_tensor_file(file)
    expected = {k for k in model.backbone.state_dict() if f".{ADAPTER_NAME}." in k}
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        for part in (".lora_A.", ".lora_B."):
            if part in name and f"{part}{ADAPTER_NAME}." not in name:
                name = name.replace(part, f"{part}{ADAPTER_NAME}.")
                break
        state[name] = value
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{file} does not match the reward LoRA: missing keys {missing[:10]}; unexpected keys {unexpected[:10]}"
        )
    own = model.backbone.state_dict()
    wrong = [k for k in state if own[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"{file}: LoRA tensors of the wrong shape: {wrong[:5]}")
    model.backbone.load_state_dict(state, strict=False)


def load_weights(model: Any, weights_dir: Path) -> None:
    """Load weights by the config's rules: LoRA + head, full model, or head only."""
    config = model.config
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {weights_dir}")
    if config.use_lora and not config.freeze_backbone:
        load_lora(model, weights_dir)
    if not config.use_lora and not config.freeze_backbone:
        file = _first_existing(weights_dir, ("full_model.safetensors", "full_model.pt"), "full model weights")
        state = _load_tensor_file(file)
        # the backbone's output layers never feed the head and are not part of the model: a full-model
        # state dict that carries them (e.g. a whole transformer's) loads without them
        unused = tuple(f"backbone.{name}." for name in model.adapter.unused_modules)
        state = {k: v for k, v in state.items() if not k.startswith(unused)}
        _strict_load(model, state, str(file))
    else:
        file = _first_existing(weights_dir, ("rm_head.safetensors", "rm_head.pt"), "reward head weights")
        _strict_load(model.reward_head, _load_tensor_file(file), str(file))
    logistic = model.config.logistic
    if model.config.use_logistic and logistic:
        with torch.no_grad():
            model.eta3.fill_(float(logistic.get("eta3", 0.0)))
            model.eta4.fill_(float(logistic.get("eta4", 0.15)))


#: Files of the layout :func:`save_model` writes (relative to the model folder); nothing else is touched.
OWN_FILES: tuple[str, ...] = (
    "config.json",
    f"checkpoint/{LORA_DIR}/adapter_config.json",
    f"checkpoint/{LORA_DIR}/adapter_model.safetensors",
    f"checkpoint/{LORA_DIR}/adapter_model.bin",
    "checkpoint/rm_head.safetensors",
    "checkpoint/rm_head.pt",
    "checkpoint/full_model.safetensors",
    "checkpoint/full_model.pt",
)
_TMP_PREFIX = ".dinalrm-save-"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")


def _is_reward_model_config(path: Path) -> bool:
    import yaml

    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except Exception:  # noqa: BLE001 - unreadable, or not JSON / YAML: not a reward-model config
        return False
    model = data.get("model") if isinstance(data, dict) else None
    return isinstance(model, dict) and "num_transformer_layers" in model and "visual_head_idx" in model


def foreign_checkpoint(folder: Path) -> str | None:
    """Why ``folder`` holds another kind of checkpoint (``None``: missing, empty, ours, or only other files).

    Another kind: a diffusers pipeline (``model_index.json``), a training run (``checkpoints/``), a
    PEFT adapter folder (``adapter_config.json`` at the top), a ``config.json`` that is not a
    reward-model config (diffusers / transformers model) or weight files at the top level.
    """
    if not folder.is_dir():
        return None
    if (folder / "model_index.json").exists():
        return "a diffusers pipeline (model_index.json)"
    if (folder / "checkpoints").is_dir():
        return "a training run folder (checkpoints/)"
    if (folder / "adapter_config.json").exists():
        return "a PEFT adapter folder (adapter_config.json)"
    config = folder / "config.json"
    if config.exists() and not _is_reward_model_config(config):
        return "a config.json that is not a reward-model config (e.g. a diffusers or transformers model)"
    weights = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if weights:
        return f"weight files of another model ({', '.join(weights[:3])})"
    return None


def _write_layout(model: Any, root: Path, state_override: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Write the project layout under ``root``; returns the relative paths written."""
    from safetensors.torch import save_file

    state = dict(model.state_dict())
    state.update(state_override or {})
    if model.config.use_logistic:
        model.config.logistic = {"eta3": float(state["eta3"]), "eta4": float(state["eta4"])}
    (root / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    weights = root / "checkpoint"
    weights.mkdir()
    contiguous = lambda sd: {k: v.detach().contiguous().cpu() for k, v in sd.items()}  # noqa: E731
    if model.config.use_lora and not model.config.freeze_backbone:
        lora_dir = weights / LORA_DIR
        lora_dir.mkdir()
        lora_state = {
            PEFT_PREFIX + k[len("backbone."):].replace(f".{ADAPTER_NAME}.", "."): v
            for k, v in state.items()
            if k.startswith("backbone.") and f".{ADAPTER_NAME}." in k
        }
        save_file(contiguous(lora_state), str(lora_dir / "adapter_model.safetensors"))
        model.lora_config.save_pretrained(str(lora_dir))
    if not model.config.use_lora and not model.config.freeze_backbone:
        save_file(contiguous(state), str(weights / "full_model.safetensors"))
    else:
        head = {k[len("reward_head."):]: v for k, v in state.items() if k.startswith("reward_head.")}
        save_file(contiguous(head), str(weights / "rm_head.safetensors"))
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def save_model(
    model: Any, folder: Path, overwrite: bool = False, state_override: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the project layout (:data:`OWN_FILES`) into ``folder``; returns ``folder``.

    Only the layout's files are replaced (a stale one that this save does not write, e.g. the LoRA of
    an earlier LoRA save, is removed); every other file in ``folder`` stays untouched. A folder that
    holds another kind of checkpoint (:func:`foreign_checkpoint`) is refused unless ``overwrite``.

    Atomicity: everything is written to a temp folder first (a failure leaves ``folder`` as it was).
    A new folder is then renamed into place in one step; in an existing folder each file is
    renamed into place (weights first, ``config.json`` last), so no file is ever half-written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save the reward model to {folder}: it is a file, not a folder")
    reason = foreign_checkpoint(folder)
    if reason is not None and not overwrite:
        raise ValueError(
            f"refusing to save the reward model into {folder}: it holds {reason}. Choose another folder, "
            "or pass overwrite=True to replace config.json and checkpoint/ there (other files are kept)"
        )
    parent = folder if folder.is_dir() else folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(parent, _TMP_PREFIX)  # ordinary permissions (mkdtemp alone would make it 0700)
    try:
        written = _write_layout(model, tmp, state_override)
        if not folder.exists():
            os.replace(tmp, folder)  # one atomic rename: the folder appears complete or not at all
            return folder
        for rel in written:  # check everything before the first rename
            in_the_way = [folder / rel] if (folder / rel).is_dir() else []
            in_the_way += [folder / p for p in Path(rel).parents if (folder / p).is_file()]
            if in_the_way:
                raise ValueError(f"cannot save {rel} into {folder}: {in_the_way[0]} is in the way")
        for rel in sorted(written, key=lambda r: r == "config.json"):  # config.json last
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, folder / rel)
        for rel in set(OWN_FILES) - set(written):
            stale = folder / rel
            if stale.is_file():
                stale.unlink()
        for sub in (folder / "checkpoint" / LORA_DIR, folder / "checkpoint"):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
