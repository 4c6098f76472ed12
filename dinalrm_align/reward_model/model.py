"""``LatentRewardModel``: DiNa-LRM on any supported backbone, with a seedable, differentiable API.

Score convention: ``score`` returns the *raw* reward (B,) float32: an uncalibrated scale where differences
of O(1) between images matter and the offset is arbitrary. ``normalize`` maps it to the display scale
``(raw + 10) / 10`` (configurable; GRPO is invariant to it, for ReFL the 1/10 acts as a learning-rate factor).

Inputs are the same for every backbone: *unpacked* normalised latents ``(B, 16, h, w)`` and what the
family's pipeline ``encode_prompt`` returns (:func:`~dinalrm_align.reward_model.text.encode_prompts`).
Nothing here wraps itself in ``torch.no_grad``: gradients flow to ``latents`` (ReFL) and to trainable
parameters (reward-model training). Wrap calls in ``torch.no_grad()`` to only score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinalrm_align.backbones.conditioning import TextConditioning
from dinalrm_align.backbones.registry import get_adapter
from dinalrm_align.reward_model import noise as noise_lib
from dinalrm_align.reward_model import validation
from dinalrm_align.reward_model.config import ADAPTER_NAME, Normalization, RewardModelConfig
from dinalrm_align.reward_model.features import Features, StopForward, TapRecorder, truncated_copy
from dinalrm_align.reward_model.head import RewardHead
from dinalrm_align.reward_model.scoring import ScoringMixin

__all__ = ["ADAPTER_NAME", "Features", "LatentRewardModel"]

#: Bounds of the optional generalised-logistic output (fixed, as in the reference design).
LOGISTIC_HIGH, LOGISTIC_LOW = 2.0, -2.0


class LatentRewardModel(ScoringMixin, nn.Module):
    """DiNa-LRM: the first N blocks of a diffusion transformer (+ reward LoRA) and a query reward head.

    Build with :meth:`from_pretrained` (released or saved checkpoints) or :meth:`from_config` (fresh
    weights). ``backbone`` is a truncated copy of the family's diffusers transformer (its module names,
    e.g. ``transformer_blocks.<i>.attn.to_q``, are the ones the released LoRA keys use).
    """

    def __init__(
        self,
        config: RewardModelConfig,
        transformer: nn.Module,
        scheduler_config: Mapping[str, Any] | None = None,
        share_base_weights: bool = False,
        lora_config: Any | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.adapter = get_adapter(config.backbone)
        if not self.adapter.matches(transformer):
            raise ValueError(
                f"the reward model's backbone is {config.backbone!r} ({self.adapter.transformer_class_name}), but the "
                f"transformer given is a {type(transformer).__name__}: use the matching pipeline's transformer"
            )
        available = self.adapter.num_tap_blocks(transformer)
        if config.num_transformer_layers > available:
            raise ValueError(
                f"num_transformer_layers={config.num_transformer_layers} exceeds the transformer's {available} "
                f"{self.adapter.tap_list}"
            )
        self.share_base_weights = share_base_weights
        self.backbone = truncated_copy(transformer, self.adapter, config.num_transformer_layers, share_base_weights)
        self.backbone.requires_grad_(False)
        head = config.reward_head
        self.reward_head = RewardHead(
            token_dim=self.adapter.token_dim(self.backbone),
            temb_dim=self.adapter.temb_dim(self.backbone),
            n_visual_taps=len(config.visual_head_idx),
            n_text_taps=len(config.text_head_idx),
            width=head.width,
            out_dim=head.out_dim,
            num_queries=head.num_queries,
            num_attn_heads=head.num_attn_heads,
            dropout=head.dropout,
            use_proj_in=head.use_proj_in,
        )
        if config.use_logistic:
            self.eta3 = nn.Parameter(torch.tensor(0.0))
            self.eta4 = nn.Parameter(torch.tensor(0.15))
        self.lora_config = None
        if config.use_lora and not config.freeze_backbone:
            self.lora_config = lora_config if lora_config is not None else self.default_lora_config(config)
            from peft import inject_adapter_in_model

            inject_adapter_in_model(self.lora_config, self.backbone, adapter_name=ADAPTER_NAME)
        self._taps = TapRecorder(self.backbone, self.adapter, list(config.visual_head_idx) + list(config.text_head_idx))
        if scheduler_config is None:  # the one it was saved with, else the family's training scheduler
            scheduler_config = config.scheduler or self.adapter.scheduler_defaults
        self.scheduler_config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        config.scheduler = dict(self.scheduler_config)  # saved with the model: a reload scores the same
        self._sigmas, self._timesteps = noise_lib.sigma_table(self.scheduler_config)
        self.requires_grad_(False)  # inference by default: `set_trainable` opts parts in
        self.eval()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def default_lora_config(config: RewardModelConfig) -> Any:
        """peft ``LoraConfig`` of the reward LoRA: r/alpha from the config, the family's suffix targets and
        the exclusion rule for the last kept block's unread context projections."""
        from peft import LoraConfig

        adapter = get_adapter(config.backbone)
        return LoraConfig(
            r=config.lora_config.r,
            lora_alpha=config.lora_config.lora_alpha,
            init_lora_weights=config.lora_config.init_lora_weights,
            target_modules=list(adapter.reward_lora_targets),
            exclude_modules=adapter.lora_exclusions(
                config.num_transformer_layers, config.text_head_idx, config.use_text_features
            ),
        )

    @classmethod
    def from_config(
        cls,
        config: RewardModelConfig | Mapping[str, Any],
        transformer: nn.Module,
        scheduler_config: Mapping[str, Any] | None = None,
        share_base_weights: bool = False,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> LatentRewardModel:
        """A reward model with a freshly initialised head (and LoRA) on ``transformer``'s first blocks."""
        if not isinstance(config, RewardModelConfig):
            config = RewardModelConfig.from_dict(config)
        model = cls(config, transformer, scheduler_config=scheduler_config, share_base_weights=share_base_weights)
        return model.to_device_dtype(device, torch_dtype)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        transformer: nn.Module | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        share_base_weights: bool = False,
        scheduler_config: Mapping[str, Any] | None = None,
        config_path: str | Path | None = None,
        revision: str | None = None,
    ) -> LatentRewardModel:
        """Load a checkpoint in the released layout or the layout of :meth:`save_pretrained`.

        Args:
            model_id_or_path: a Hugging Face repo id (``snapshot_download``), a local folder holding
                ``config.json`` and ``checkpoint/`` (or a training checkpoint whose config lies in a parent
                folder), or a tiny built-in id (``tiny``, ``tiny-flux``, ``tiny-zimage``, optionally ``:SEED``).
            transformer: the base transformer to take the first N blocks from; it must be of the
                checkpoint's family. If omitted, ``config.model.backbone_model_id`` is loaded.
            torch_dtype, device: where the reward model lives.
            share_base_weights: tie the blocks' base weights to ``transformer`` (saves memory). Unsafe when
                the transformer's base weights are trained (full fine-tuning) or sharded (ZeRO-3 / FSDP).
            scheduler_config: flow-matching scheduler config defining the sigma table ``u`` is looked up in
                (default: the one saved with the model, else the family's training scheduler, e.g. SD3.5's
                1000 steps with shift 3).
            config_path: explicit config file (overrides the one found next to the checkpoint).
        """
        from dinalrm_align.reward_model import checkpoint as ckpt
        from dinalrm_align.tiny_pipelines import parse_tiny_id

        tiny = parse_tiny_id(str(model_id_or_path))
        if tiny is not None:
            from dinalrm_align.reward_model.tiny_build import build_tiny_reward_model

            family, seed = tiny
            model = build_tiny_reward_model(cls, family, transformer, seed=seed, scheduler_config=scheduler_config,
                                            share_base_weights=share_base_weights)
            return model.to_device_dtype(device, torch_dtype)
        folder = ckpt.resolve_model_folder(model_id_or_path, revision=revision)
        config_file = Path(config_path) if config_path is not None else ckpt.find_config(folder)
        config = RewardModelConfig.from_file(config_file)
        weights_dir = ckpt.find_weights_dir(folder)
        adapter = get_adapter(config.backbone)
        if transformer is None:
            transformer = adapter.load_transformer(config.backbone_model_id, torch_dtype)
        if share_base_weights:
            _check_shareable(transformer, torch_dtype, device)
        lora_config = ckpt.read_lora_config(weights_dir) if (config.use_lora and not config.freeze_backbone) else None
        model = cls(config, transformer, scheduler_config=scheduler_config, share_base_weights=share_base_weights,
                    lora_config=lora_config)
        ckpt.load_weights(model, weights_dir)
        return model.to_device_dtype(device, torch_dtype)

    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``checkpoint/{backbone_lora/, rm_head.safetensors}`` atomically; only this
        model's own files in ``folder`` are replaced (see :func:`checkpoint.save_model`)."""
        from dinalrm_align.reward_model import checkpoint as ckpt

        return ckpt.save_model(self, Path(folder), overwrite=overwrite)

    def to_device_dtype(self, device: str | torch.device | None, dtype: torch.dtype | None) -> LatentRewardModel:
        """Move/cast, leaving shared base weights untouched (they follow the policy transformer)."""
        if device is None and dtype is None:
            return self
        if not self.share_base_weights:
            return self.to(device=device, dtype=dtype)
        own = [self.reward_head] + [m for n, m in self.backbone.named_modules() if n.endswith(ADAPTER_NAME)]
        for module in own:
            module.to(device=device, dtype=dtype)
        for name in ("eta3", "eta4"):
            if hasattr(self, name):
                getattr(self, name).data = getattr(self, name).data.to(device=device, dtype=dtype)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the backbone's block activations in the backward pass (ReFL, reward-model training)."""
        self.backbone.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ parameters
    def _lora_layers(self) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.backbone.modules() if isinstance(m, BaseTunerLayer)]

    @property
    def lora_merged(self) -> bool:
        """Whether the reward LoRA has been folded into the backbone's base weights."""
        return any(getattr(m, "merged", False) for m in self._lora_layers())

    def merge_reward_lora(self) -> LatentRewardModel:
        """Fold the reward LoRA into the backbone's own base weights (inference only; removes the unmerged
        LoRA's extra matmuls). Not possible with ``share_base_weights=True`` (the base tensors are the policy's)."""
        if self.share_base_weights:
            raise ValueError("merge_reward_lora() would modify the shared transformer's weights (share_base_weights=True)")
        for layer in self._lora_layers():
            if not layer.merged:
                layer.merge(adapter_names=[ADAPTER_NAME])
        return self

    def set_trainable(self, lora: bool = True, head: bool = True, backbone: bool = False) -> list[nn.Parameter]:
        """Choose what trains (reward-model training); returns the trainable parameters."""
        if (lora or backbone) and self.lora_config is not None and self.lora_merged:
            raise ValueError("the reward LoRA is merged into the base weights; load the model again to train it")
        if backbone and self.share_base_weights:
            raise ValueError("set_trainable(backbone=True) would train the policy's shared base weights "
                             "(share_base_weights=True)")
        self.requires_grad_(False)
        for name, param in self.backbone.named_parameters():
            if (lora and "lora_" in name) or (backbone and "lora_" not in name):
                param.requires_grad_(True)
        if head:
            self.reward_head.requires_grad_(True)
            for name in ("eta3", "eta4"):
                if hasattr(self, name):
                    getattr(self, name).requires_grad_(True)
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def dtype(self) -> torch.dtype:
        return self.reward_head.head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.reward_head.head.weight.device

    @property
    def normalization(self) -> Normalization:
        return self.config.normalization

    @property
    def embedded_guidance(self) -> float | None:
        """Guidance fed to a guidance-distilled backbone (None for the others)."""
        if not self.adapter.guidance_embedded(self.backbone):
            return None
        value = self.config.embedded_guidance
        return float(value if value is not None else self.adapter.default_embedded_guidance)

    # ------------------------------------------------------------------ the forward
    def conditioning(self, prompt_embeds: Any, pooled_prompt_embeds: Any = None) -> TextConditioning:
        """The family's text outputs (or a :class:`TextConditioning`) -> a checked conditioning."""
        cond = prompt_embeds if isinstance(prompt_embeds, TextConditioning) else \
            self.adapter.conditioning(prompt_embeds, pooled_prompt_embeds)
        for name, tensor in (("prompt_embeds", cond.embeds), ("pooled_prompt_embeds", cond.pooled)):
            if tensor is not None:
                validation.check_finite(tensor, name)
                validation.check_magnitude(tensor, name)
        return cond

    def _check(self, latents: Any, cond: TextConditioning) -> None:
        self.adapter.check_latents(latents, self.backbone)
        self.adapter.check_conditioning(cond, self.backbone, latents.shape[0])

    def _head_output(self, raw: torch.Tensor) -> torch.Tensor:
        if self.config.use_logistic:
            scale = torch.abs(self.eta4) + 1e-6
            raw = (LOGISTIC_HIGH - LOGISTIC_LOW) / (1 + torch.exp(-(raw - self.eta3) / scale)) + LOGISTIC_LOW
        raw = raw.float()
        return raw[:, 0] if raw.shape[-1] == 1 else raw

    def _features(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: TextConditioning) -> Features:
        """Tapped features of already-noised latents at per-sample noise levels ``sigma`` (B,)."""
        dtype = next(self.backbone.parameters()).dtype
        cond = cond.to(device=noisy.device, dtype=dtype)
        noisy = noisy.to(dtype)
        kwargs = self.adapter.forward_kwargs(noisy, sigma.to(noisy.device), cond, self.embedded_guidance)
        with self._taps.recording(self.adapter.tap_meta(noisy, cond)) as record:
            try:
                self.backbone(**kwargs, return_dict=False)
            except StopForward:  # raised after the deepest tap: the rest of the forward is never computed
                pass
        return self._taps.features(record, self.config.visual_head_idx, self.config.text_head_idx)

    def _reward(self, feats: Features) -> torch.Tensor:
        return self._head_output(self.reward_head(feats.image, feats.text, feats.temb, text_mask=feats.text_mask))

    def features(
        self,
        latents: torch.Tensor,
        prompt_embeds: Any,
        pooled_prompt_embeds: Any = None,
        *,
        sigma: torch.Tensor | float | Sequence[float],
        noise: torch.Tensor | None = None,
    ) -> Features:
        """Tapped features of ``x_sigma = (1 - sigma) x0 + sigma * noise`` at the exact ``sigma`` (B,) (no table
        lookup), for probing and parity tests. Taps are the config's 1-based block counts."""
        cond = self.conditioning(prompt_embeds, pooled_prompt_embeds)
        self._check(latents, cond)
        b = latents.shape[0]
        sig = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(b).to(latents.device)
        eps = torch.randn_like(latents) if noise is None else validation.check_noise(noise, latents.shape).to(latents.device)
        return self._features(noise_lib.add_noise(latents, eps, sig), sig, cond)


def _check_shareable(transformer: nn.Module, dtype: torch.dtype | None, device: str | torch.device | None) -> None:
    """Sharing ties tensors: the transformer must already have the requested dtype and device."""
    param = next(transformer.parameters())
    if dtype is not None and param.dtype != dtype:
        raise ValueError(
            f"share_base_weights=True needs the transformer already in {dtype} (it is {param.dtype}); "
            "cast the pipeline first or use share_base_weights=False"
        )
    if device is not None and param.device != torch.device(device):
        raise ValueError(
            f"share_base_weights=True needs the transformer already on {device} (it is on {param.device}); "
            "move the pipeline first or use share_base_weights=False"
        )
