"""Reading and writing reward-model checkpoints.

Released layout (``liuhuohuo/DiNa-LRM-SD35M-12layers``)::

    config.json                  full training config; only ``model`` (+ ``training.add_noise``) matter here
    checkpoint/backbone_lora/    PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    checkpoint/rm_head.pt        torch.save of the head state dict (loaded with weights_only=True)

The project's own layout is the same with ``rm_head.safetensors`` instead of ``rm_head.pt``
(and ``full_model.safetensors`` instead of ``full_model.pt`` for a fully fine-tuned backbone).
Training runs write checkpoints as ``<run>/checkpoints/step_XXXXXX/`` with ``config.json`` at
the run root; pointing :func:`find_config` at such a folder finds the parent's config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from dinalrm_align.reward_model.model import LatentRewardModel

CONFIG_NAMES = ("config.json", "config.yaml", "config.yml")
LORA_DIR = "backbone_lora"
PEFT_PREFIX = "base_model.model."


def resolve_model_folder(model_id_or_path: str | Path, revision: str | None = None) -> Path:
    """A local folder as is, otherwise a hub snapshot; a miss is a clear ``FileNotFoundError``."""
    path = Path(model_id_or_path).expanduser()
    if path.is_dir():
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


def load_base_transformer(model_id: str, torch_dtype: torch.dtype | None):
    """The SD3 transformer named in the config (``<id>/transformer``), with a clear offline error."""
    from diffusers import SD3Transformer2DModel

    try:
        return SD3Transformer2DModel.from_pretrained(
            model_id, subfolder="transformer", torch_dtype=torch_dtype
        )
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"could not load the base transformer {model_id!r} (subfolder 'transformer') named by the reward "
            f"model's config: {exc}. Pass transformer=pipe.transformer, or make the model available locally "
            "(HF_HUB_OFFLINE=1 only uses the cache)."
        ) from exc


def find_config(folder: Path) -> Path:
    """``config.json`` (or .yaml) in ``folder`` or, for a training checkpoint, its run folder."""
    for base in (folder, folder.parent, folder.parent.parent):
        for name in CONFIG_NAMES:
            if (base / name).is_file():
                return base / name
    raise FileNotFoundError(f"no config.json (or config.yaml) found in {folder} or its parent folders")


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


def load_lora(model: LatentRewardModel, weights_dir: Path) -> None:
    """Load a PEFT adapter folder (keys ``base_model.model.<module>.lora_X.weight``) into ``rm_lora``."""
    from dinalrm_align.reward_model.model import ADAPTER_NAME

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


def load_weights(model: LatentRewardModel, weights_dir: Path) -> None:
    """Load weights by the config's rules: LoRA + head, full model, or head only."""
    config = model.config
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {weights_dir}")
    if config.use_lora and not config.freeze_backbone:
        load_lora(model, weights_dir)
    if not config.use_lora and not config.freeze_backbone:
        file = _first_existing(weights_dir, ("full_model.safetensors", "full_model.pt"), "full model weights")
        state = _load_tensor_file(file)
        _strict_load(model, state, str(file))
    else:
        file = _first_existing(weights_dir, ("rm_head.safetensors", "rm_head.pt"), "reward head weights")
        _strict_load(model.reward_head, _load_tensor_file(file), str(file))
    logistic = model.config.logistic
    if model.config.use_logistic and logistic:
        with torch.no_grad():
            model.eta3.fill_(float(logistic.get("eta3", 0.0)))
            model.eta4.fill_(float(logistic.get("eta4", 0.15)))


def _atomic_dir(target: Path):
    """Context manager yielding a temp folder that replaces ``target`` on success."""

    class _Atomic:
        def __enter__(self) -> Path:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
            os.replace(self.tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    return _Atomic()


def save_model(model: LatentRewardModel, folder: Path) -> Path:
    """Write the project layout atomically (temp folder, then rename). Returns ``folder``."""
    from safetensors.torch import save_file

    from dinalrm_align.reward_model.model import ADAPTER_NAME

    if model.config.use_logistic:
        model.config.logistic = {"eta3": float(model.eta3.detach()), "eta4": float(model.eta4.detach())}
    config = model.config.to_dict()
    with _atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        weights = tmp / "checkpoint"
        weights.mkdir()
        contiguous = lambda sd: {k: v.detach().contiguous().cpu() for k, v in sd.items()}  # noqa: E731
        if model.config.use_lora and not model.config.freeze_backbone:
            lora_dir = weights / LORA_DIR
            lora_dir.mkdir()
            lora_state = {
                PEFT_PREFIX + k.replace(f".{ADAPTER_NAME}.", "."): v
                for k, v in model.backbone.state_dict().items()
                if f".{ADAPTER_NAME}." in k
            }
            save_file(contiguous(lora_state), str(lora_dir / "adapter_model.safetensors"))
            model.lora_config.save_pretrained(str(lora_dir))
        if not model.config.use_lora and not model.config.freeze_backbone:
            save_file(contiguous(model.state_dict()), str(weights / "full_model.safetensors"))
        else:
            save_file(contiguous(model.reward_head.state_dict()), str(weights / "rm_head.safetensors"))
    return folder
