"""``LatentRewardModel``: DiNa-LRM with a seedable, differentiable scoring API.

Score convention: ``score`` returns the *raw* reward (B,) float32 -- an uncalibrated scale where
differences of O(1) between images matter and the offset is arbitrary. ``normalize`` maps it to
the display scale ``(raw + 10) / 10`` (configurable; GRPO is invariant to it, for ReFL the 1/10
acts as a learning-rate factor).

Nothing here wraps itself in ``torch.no_grad``: gradients flow to ``latents`` (ReFL) and to
trainable parameters (reward-model training). Wrap calls in ``torch.no_grad()`` to only score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinalrm_align.reward_model import noise as noise_lib
from dinalrm_align.reward_model import validation
from dinalrm_align.reward_model.backbone import LORA_TARGET_MODULES, LatentBackbone, lora_exclusions
from dinalrm_align.reward_model.config import Normalization, RewardModelConfig
from dinalrm_align.reward_model.head import RewardHead

#: Name of the reward LoRA adapter inside the backbone (never ``default``, which policies use).
ADAPTER_NAME = "rm_lora"
#: Bounds of the optional generalised-logistic output (fixed, as in the reference design).
LOGISTIC_HIGH, LOGISTIC_LOW = 2.0, -2.0


class LatentRewardModel(nn.Module):
    """DiNa-LRM: first-N-blocks SD3 backbone (+ reward LoRA) and a query reward head.

    Build with :meth:`from_pretrained` (released or saved checkpoints) or :meth:`from_config`
    (fresh weights). Attribute names (``backbone``, ``reward_head``, ``eta3``, ``eta4``) match the
    reference implementation's full-model state dict.
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
        self.share_base_weights = share_base_weights
        self.backbone = LatentBackbone(
            transformer,
            config.num_transformer_layers,
            config.visual_head_idx,
            config.text_head_idx if config.use_text_features else [],
            share_base_weights=share_base_weights,
        )
        self.backbone.requires_grad_(False)
        temb_dim = self.backbone.inner_dim
        head = config.reward_head
        self.reward_head = RewardHead(
            token_dim=self.backbone.inner_dim,
            temb_dim=temb_dim,
            n_visual_taps=len(config.visual_head_idx),
            n_text_taps=len(self.backbone.text_taps),
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
        self._sigmas, self._timesteps = noise_lib.sigma_table(scheduler_config)
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        # Inference by default: everything frozen; `set_trainable` opts parts in.
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def default_lora_config(config: RewardModelConfig):
        """PEFT ``LoraConfig`` of the reward LoRA: r/alpha from the config, suffix targets, exclusion rule."""
        from peft import LoraConfig

        return LoraConfig(
            r=config.lora_config.r,
            lora_alpha=config.lora_config.lora_alpha,
            init_lora_weights=config.lora_config.init_lora_weights,
            target_modules=list(LORA_TARGET_MODULES),
            exclude_modules=lora_exclusions(
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
        """A reward model with freshly initialised head (and LoRA) on ``transformer``'s first blocks."""
        if not isinstance(config, RewardModelConfig):
            config = RewardModelConfig.from_dict(config)
        model = cls(
            config, transformer, scheduler_config=scheduler_config, share_base_weights=share_base_weights
        )
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
            model_id_or_path: a Hugging Face repo id (fetched with ``snapshot_download``) or a
                local folder holding ``config.json`` and ``checkpoint/`` (or a checkpoint folder
                whose config lies in the parent, as training writes it).
            transformer: the base SD3 transformer to take the first N blocks from. If omitted,
                ``config.model.backbone_model_id`` (subfolder ``transformer``) is loaded.
            torch_dtype, device: where the reward model lives (default: the transformer's).
            share_base_weights: tie the blocks' base weights to ``transformer`` (saves memory).
                Unsafe when the transformer's base weights are trained (full fine-tuning) or
                sharded (DeepSpeed ZeRO-3 / FSDP): the reward would then move or break.
            scheduler_config: flow-matching scheduler config defining the sigma table (default
                SD3.5's: 1000 steps, shift 3).
            config_path: explicit config file (overrides the one found next to the checkpoint).
        """
        from dinalrm_align.reward_model import checkpoint as ckpt

        folder = ckpt.resolve_model_folder(model_id_or_path, revision=revision)
        config_file = Path(config_path) if config_path is not None else ckpt.find_config(folder)
        config = RewardModelConfig.from_file(config_file)
        weights_dir = ckpt.find_weights_dir(folder)
        if transformer is None:
            transformer = ckpt.load_base_transformer(config.backbone_model_id, torch_dtype)
        if share_base_weights:
            _check_shareable(transformer, torch_dtype, device)
        lora_config = (
            ckpt.read_lora_config(weights_dir) if (config.use_lora and not config.freeze_backbone) else None
        )
        model = cls(
            config,
            transformer,
            scheduler_config=scheduler_config,
            share_base_weights=share_base_weights,
            lora_config=lora_config,
        )
        ckpt.load_weights(model, weights_dir)
        return model.to_device_dtype(device, torch_dtype)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` + ``checkpoint/{backbone_lora/, rm_head.safetensors}`` atomically."""
        from dinalrm_align.reward_model import checkpoint as ckpt

        return ckpt.save_model(self, Path(folder))

    def to_device_dtype(
        self, device: str | torch.device | None, dtype: torch.dtype | None
    ) -> LatentRewardModel:
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

    # ------------------------------------------------------------------ parameters
    @property
    def lora_merged(self) -> bool:
        """Whether the reward LoRA has been folded into the backbone's base weights."""
        return any(getattr(m, "merged", False) for m in self._lora_layers())

    def _lora_layers(self) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.backbone.modules() if isinstance(m, BaseTunerLayer)]

    def merge_reward_lora(self) -> LatentRewardModel:
        """Fold the reward LoRA into the backbone's own base weights (inference only).

        Removes the unmerged LoRA's extra matmuls (~2-3 % of the reward's FLOPs at SD3.5 scale).
        Not possible with ``share_base_weights=True`` (the base tensors belong to the policy).
        ``save_pretrained`` still writes the LoRA separately; training the LoRA afterwards is refused.
        """
        if self.share_base_weights:
            raise ValueError(
                "merge_reward_lora() would modify the shared transformer's weights (share_base_weights=True)"
            )
        for layer in self._lora_layers():
            if not layer.merged:
                layer.merge(adapter_names=[ADAPTER_NAME])
        return self

    def set_trainable(
        self, lora: bool = True, head: bool = True, backbone: bool = False
    ) -> list[nn.Parameter]:
        """Choose what trains (reward-model training); returns the trainable parameters."""
        if (lora or backbone) and self.lora_config is not None and self.lora_merged:
            raise ValueError("the reward LoRA is merged into the base weights; load the model again to train it")
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

    # ------------------------------------------------------------------ noise
    def sigma_for(self, u: torch.Tensor | float | Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest table ``(sigma, timestep)`` for target noise level(s) ``u`` -> each (B,) float32."""
        if not isinstance(u, torch.Tensor):
            u = torch.tensor(validation.check_noise_levels(u), dtype=torch.float32)
        return noise_lib.nearest_sigma(u, self._sigmas, self._timesteps)

    def _draw_noise(
        self, shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        if generator is None:
            return torch.randn(tuple(shape), device=like.device, dtype=like.dtype)
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=like.dtype).to(
            like.device
        )

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, latents: Any, prompt_embeds: Any, pooled: Any) -> None:
        bb = self.backbone
        validation.check_latents(
            latents,
            in_channels=bb.in_channels,
            patch_size=bb.patch_size,
            pos_embed_max_size=bb.pos_embed_max_size,
        )
        validation.check_text_conditions(
            prompt_embeds,
            pooled,
            batch_size=latents.shape[0],
            joint_attention_dim=bb.joint_attention_dim,
            pooled_projection_dim=bb.pooled_projection_dim,
        )

    def _head_output(self, raw: torch.Tensor) -> torch.Tensor:
        if self.config.use_logistic:
            scale = torch.abs(self.eta4) + 1e-6
            raw = (LOGISTIC_HIGH - LOGISTIC_LOW) / (1 + torch.exp(-(raw - self.eta3) / scale)) + LOGISTIC_LOW
        raw = raw.float()
        return raw[:, 0] if raw.shape[-1] == 1 else raw

    def _features(self, noisy: torch.Tensor, timestep: torch.Tensor, pe: torch.Tensor, pooled: torch.Tensor):
        dtype = self.backbone.context_embedder.weight.dtype
        return self.backbone(noisy.to(dtype), pe.to(dtype), pooled.to(dtype), timestep.to(noisy.device))

    def forward_noisy(
        self,
        noisy_latents: torch.Tensor,
        sigma: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """Raw reward of already-noised latents at noise level(s) ``sigma`` (B,) (timestep 1000*sigma).

        Used by reward-model training, where chosen and rejected share one noise draw.
        Returns (B,) float32 (or (B, out_dim) if ``out_dim > 1``).
        """
        self._check_inputs(noisy_latents, prompt_embeds, pooled_prompt_embeds)
        sigma = sigma.reshape(-1).to(torch.float32)
        timestep = sigma * 1000.0
        temb, vis, txt = self._features(noisy_latents, timestep, prompt_embeds, pooled_prompt_embeds)
        return self._head_output(self.reward_head(vis, txt, temb))

    def score(
        self,
        latents: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        u: float = 0.4,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        n_noise: int = 1,
    ) -> torch.Tensor:
        """Raw reward of clean SD3-normalised latents, re-noised at sigma ~= ``u``.

        Args:
            latents: (B, 16, H/8, W/8) clean latents, as ``output_type="latent"`` returns them.
            prompt_embeds: (B, 77 + L, 4096) SD3 prompt embeddings (see :func:`encode_prompts`).
            pooled_prompt_embeds: (B, 2048).
            u: target noise level in [0, 1]; 0.4 for generated latents, 0.1 for encoded real images.
            noise: optional fixed noise, (B, C, H, W) for ``n_noise=1`` or (n_noise, B, C, H, W);
                makes the call deterministic.
            generator: seeds the noise when ``noise`` is not given.
            n_noise: average the reward over this many independent noise draws (one batched pass).

        Returns:
            (B,) float32 raw reward (differentiable w.r.t. ``latents`` and trainable parameters).
        """
        self._check_inputs(latents, prompt_embeds, pooled_prompt_embeds)
        (u_value,) = validation.check_noise_levels(u)
        if isinstance(n_noise, bool) or not isinstance(n_noise, int) or n_noise < 1:
            raise ValueError(f"n_noise must be a positive integer, got {n_noise!r}")
        b = latents.shape[0]
        draws_shape = (n_noise, *latents.shape)
        if noise is None:
            eps = self._draw_noise(draws_shape, latents, generator)
        else:
            expected = tuple(latents.shape) if n_noise == 1 and noise.dim() == 4 else draws_shape
            eps = validation.check_noise(noise, expected).reshape(draws_shape).to(latents.device)
        sigma, timestep = self.sigma_for(torch.full((n_noise * b,), u_value))
        x0 = latents.unsqueeze(0).expand(draws_shape).reshape(n_noise * b, *latents.shape[1:])
        noisy = (
            noise_lib.add_noise(x0, eps.reshape_as(x0), sigma.to(latents.device))
            if self.config.add_noise
            else x0
        )
        reps = (n_noise, 1, 1)
        temb, vis, txt = self._features(
            noisy, timestep, prompt_embeds.repeat(reps), pooled_prompt_embeds.repeat(n_noise, 1)
        )
        raw = self._head_output(self.reward_head(vis, txt, temb))
        return raw.reshape(n_noise, b, *raw.shape[1:]).mean(dim=0)

    def score_ensemble(
        self,
        latents: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        us: Sequence[float] = (0.2, 0.5, 0.7),
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Multi-noise ensemble (DiNa-LRM*): one shared noise, K noise levels, token concatenation.

        The K backbone passes run as ONE batched pass (K*B rows); each level's features are
        FiLM-modulated with that level's timestep embedding, then all tokens are concatenated and
        the queries read them once. Cost ~K x a single-level backbone pass. Returns (B,) raw.
        """
        self._check_inputs(latents, prompt_embeds, pooled_prompt_embeds)
        levels = validation.check_noise_levels(list(us), name="us")
        k, b = len(levels), latents.shape[0]
        eps = (
            self._draw_noise(latents.shape, latents, generator)
            if noise is None
            else validation.check_noise(noise, latents.shape).to(latents.device)
        )
        sigma, timestep = self.sigma_for(torch.tensor(levels, dtype=torch.float32).repeat_interleave(b))
        x0 = latents.repeat(k, 1, 1, 1)
        noisy = (
            noise_lib.add_noise(x0, eps.repeat(k, 1, 1, 1), sigma.to(latents.device))
            if self.config.add_noise
            else x0
        )
        temb, vis, txt = self._features(
            noisy, timestep, prompt_embeds.repeat(k, 1, 1), pooled_prompt_embeds.repeat(k, 1)
        )
        return self._head_output(self.reward_head.forward_ensemble(vis, txt, temb, num_levels=k))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Display scale ``(raw + offset) / scale`` (default ``(raw + 10) / 10``, ~[0, 2] centred near 1)."""
        norm = self.config.normalization
        return (raw + norm.offset) / norm.scale

    def preference_probability(self, raw_a: torch.Tensor, raw_b: torch.Tensor) -> torch.Tensor:
        """P(a preferred over b) = sigmoid((a - b) / T) with the calibrated temperature (T=1 if none)."""
        temperature = self.config.normalization.temperature or 1.0
        return torch.sigmoid((raw_a - raw_b) / temperature)

    def score_images(
        self, images: Any, prompts: Sequence[str] | str, pipe: Any, u: float = 0.1, **kwargs: Any
    ) -> torch.Tensor:
        """Score PIL images, [0, 1] tensors (B, 3, H, W) or file paths; see :func:`images.score_images`."""
        from dinalrm_align.reward_model.images import score_images

        return score_images(self, images, prompts, pipe, u=u, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layers={c.num_transformer_layers}, visual_taps={c.visual_head_idx}, text_taps={c.text_head_idx}, "
            f"lora={f'r{c.lora_config.r}/a{c.lora_config.lora_alpha}' if self.lora_config else 'none'}, "
            f"shared_base={self.share_base_weights}"
        )


def _check_shareable(
    transformer: nn.Module, dtype: torch.dtype | None, device: str | torch.device | None
) -> None:
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
