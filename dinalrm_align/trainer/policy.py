"""The policy: load an SD3 pipeline, make its transformer trainable (LoRA or full), save the result.

dtypes: frozen weights are stored in the mixed-precision dtype, trainable ones in fp32 (autocast
does the rest); the VAE stays fp32. The LoRA is saved in diffusers' format WITH its adapter
metadata, so ``StableDiffusion3Pipeline.load_lora_weights(folder)`` restores the exact outputs
(without the metadata a reload rescales the LoRA).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dinalrm_align.trainer.config import LoraSettings, ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusion3Pipeline


def tiny_seed(spec: str) -> int | None:
    """``"tiny"`` -> 0, ``"tiny:3"`` -> 3, anything else -> None."""
    if spec == "tiny":
        return 0
    if spec.startswith("tiny:"):
        try:
            return int(spec.split(":", 1)[1])
        except ValueError as exc:
            raise ValueError(f"bad tiny model spec {spec!r}: expected 'tiny' or 'tiny:SEED'") from exc
    return None


def load_pipeline(config: ModelConfig, weight_dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """Load the SD3 pipeline named by ``config.pretrained`` (``tiny[:SEED]``, a local folder or a hub id).

    Text encoders and transformer are cast to ``weight_dtype``; the VAE stays fp32; everything is
    frozen and in eval mode. Raises FileNotFoundError naming the id (and ``HF_HUB_OFFLINE``) on a miss.
    """
    seed = tiny_seed(config.pretrained)
    if seed is not None:
        from dinalrm_align.testing import tiny_sd3_pipeline

        pipe = tiny_sd3_pipeline(seed)
    else:
        from dinalrm_align.reward_model.pipeline_loading import load_sd3_pipeline

        spec = config.pretrained
        path = Path(spec).expanduser()
        if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            raise FileNotFoundError(f"policy pipeline folder not found: {spec} (model.pretrained)")
        kwargs: dict[str, Any] = {}
        if config.revision:
            kwargs["revision"] = config.revision
        if config.variant:
            kwargs["variant"] = config.variant
        pipe = load_sd3_pipeline(str(path) if path.exists() else spec, torch_dtype=weight_dtype, **kwargs)
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(dtype=weight_dtype).requires_grad_(False).eval()
    pipe.vae.to(dtype=torch.float32).requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_config(settings: LoraSettings) -> Any:
    """peft ``LoraConfig`` of the policy adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian" if settings.init == "gaussian" else True,
        target_modules=list(settings.target_modules),
    )


def make_trainable(
    transformer: torch.nn.Module,
    config: ModelConfig,
    weight_dtype: torch.dtype = torch.float32,
) -> list[torch.nn.Parameter]:
    """Add the policy LoRA (or unfreeze everything) and return the trainable parameters (fp32).

    LoRA: base weights frozen in ``weight_dtype``, adapter ``config.lora.adapter_name`` in fp32.
    Full fine-tuning: the whole transformer in fp32 and trainable.
    """
    if config.finetune == "lora":
        transformer.to(dtype=weight_dtype)
        try:
            transformer.add_adapter(lora_config(config.lora), adapter_name=config.lora.adapter_name)
        except ValueError as exc:
            raise ValueError(
                f"model.lora.target_modules {config.lora.target_modules} do not match the transformer: {exc}"
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


def trainable_named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies (CPU) of the trainable parameters, by name."""
    return {n: p.detach().cpu().clone() for n, p in trainable_named_parameters(module)}


@torch.no_grad()
def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters (names and shapes must match exactly)."""
    params = dict(trainable_named_parameters(module))
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint weights do not match the trainable parameters: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, param in params.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(state[name].shape)} vs {tuple(param.shape)}")
        param.data.copy_(state[name].to(param.device, param.dtype))


def save_lora(
    transformer: torch.nn.Module,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the policy LoRA in diffusers' format with adapter metadata (``load_lora_weights`` works)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # PEFT key names as diffusers' SD3 LoRA scripts save them. convert_state_dict_to_diffusers would
    # rename attn.to_q/k/v/out.0 to the legacy "lora.down/up" form, which SD3 loading silently drops.
    layers = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=adapter_name)
    layers = {k: v.detach().cpu().float().contiguous() for k, v in layers.items()}
    metadata = transformer.peft_config[adapter_name].to_dict()
    StableDiffusion3Pipeline.save_lora_weights(
        out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
    )
    return out


def save_full(transformer: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Save a fully fine-tuned transformer as a folder ``SD3Transformer2DModel.from_pretrained`` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out, safe_serialization=True)
    return out
