"""The policy: load a pipeline (any backbone), make its transformer trainable (LoRA or full), save the result.

dtypes: frozen weights are stored in the mixed-precision dtype, trainable ones in fp32 (autocast does
the rest); the VAE stays fp32. The LoRA is saved in diffusers' format WITH its adapter metadata, so
``<Pipeline>.load_lora_weights(folder)`` restores the exact outputs (without the metadata a reload
rescales the LoRA).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.trainer.config import LoraSettings, ModelConfig

__all__ = ["load_pipeline", "lora_config", "make_trainable", "save_full", "save_lora"]


def load_pipeline(config: ModelConfig, weight_dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(pipeline, adapter)`` of ``config.pretrained`` (tiny id, local folder or hub id).

    Everything frozen and in eval mode: transformer and text encoders in ``weight_dtype``, VAE in fp32.
    Raises FileNotFoundError naming the id (and ``HF_HUB_OFFLINE``) on a miss, ValueError if the
    pipeline's family does not match ``config.backbone``.
    """
    from dinalrm_align.backbones.loading import load_any_pipeline

    kwargs: dict[str, Any] = {}
    if config.revision:
        kwargs["revision"] = config.revision
    if config.variant:
        kwargs["variant"] = config.variant
    pipe, adapter = load_any_pipeline(config.pretrained, backbone=config.backbone, torch_dtype=weight_dtype,
                                      what="model.pretrained", **kwargs)
    adapter.freeze_pipeline(pipe, weight_dtype)
    return pipe, adapter


def lora_config(settings: LoraSettings, adapter: Any) -> Any:
    """peft ``LoraConfig`` of the policy adapter (the backbone's defaults where the recipe says null / default)."""
    from peft import LoraConfig

    r = settings.r if settings.r is not None else adapter.policy_lora_rank
    alpha = settings.alpha if settings.alpha is not None else adapter.policy_lora_alpha
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian" if settings.init == "gaussian" else True,
        target_modules=adapter.lora_targets(settings.target_modules),
    )


def make_trainable(
    transformer: torch.nn.Module, config: ModelConfig, adapter: Any, weight_dtype: torch.dtype = torch.float32
) -> list[torch.nn.Parameter]:
    """Add the policy LoRA (or unfreeze everything) and return the trainable parameters (fp32).

    LoRA: base weights frozen in ``weight_dtype``, adapter ``config.lora.adapter_name`` in fp32.
    Full fine-tuning: the whole transformer in fp32 and trainable.
    """
    if config.finetune == "lora":
        transformer.to(dtype=weight_dtype)
        cfg = lora_config(config.lora, adapter)
        try:
            transformer.add_adapter(cfg, adapter_name=config.lora.adapter_name)
        except ValueError as exc:
            raise ValueError(
                f"model.lora.target_modules {sorted(cfg.target_modules)} do not match the {adapter.name} transformer: {exc}"
            ) from exc
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    else:
        transformer.to(dtype=torch.float32)
        transformer.requires_grad_(True)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters (check model.finetune / model.lora)")
    return params


def save_lora(
    transformer: torch.nn.Module,
    pipeline_class: type,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """The policy LoRA in diffusers' format with adapter metadata (``<Pipeline>.load_lora_weights`` works).

    ``state_dict``: trainable weights by parameter name (e.g. gathered from ZeRO-3 shards, EMA swapped in).
    """
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # PEFT key names as diffusers' LoRA scripts save them (the legacy "lora.down/up" renaming of
    # convert_state_dict_to_diffusers makes SD3 loading silently drop the attention LoRA).
    layers = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=adapter_name)
    layers = {k: v.detach().cpu().float().contiguous() for k, v in layers.items()}
    metadata = transformer.peft_config[adapter_name].to_dict()
    pipeline_class.save_lora_weights(out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
    return out


def save_full(transformer: torch.nn.Module, out_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A fully fine-tuned transformer as a folder ``<Transformer>.from_pretrained`` loads.

    ``state_dict``: the (gathered) weights to write instead of the module's own (e.g. from ZeRO-3 shards).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        transformer.save_pretrained(out, safe_serialization=True)
    else:
        transformer.save_config(out)
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
                  str(out / "diffusion_pytorch_model.safetensors"))
    return out
