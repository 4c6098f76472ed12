"""The backbone adapter: everything that differs between model families, behind one small interface.

An adapter owns *facts* about one family of diffusers models (SD3.5, FLUX.1, Z-Image): how to load the
pipeline, how its latents are normalised and shaped, how prompts are encoded, which noise schedule its
pipeline samples with, and how its transformer is called at noise level sigma. Everything else in the
package (the reward head, losses, noise, samplers, trainers, plug-ins, server) is backbone-neutral and
talks to the model only through an adapter.

Conventions shared by every adapter:

* latents are the *unpacked*, normalised ``(B, C, h, w)`` tensor, ``(z_vae - shift) * scale``;
* ``x_sigma = (1 - sigma) * x0 + sigma * noise`` and a velocity is ``v = noise - x0`` (so an Euler step
  is ``x + (sigma_next - sigma) * v``), whatever the family's own sign and time conventions are;
* ``sigma`` is the flow-matching noise level in [0, 1] (one value or ``(B,)``);
* prompt conditioning is a :class:`~dinalrm_align.backbones.conditioning.TextConditioning`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from dinalrm_align.backbones.conditioning import TextConditioning

__all__ = ["BackboneAdapter", "reward_head_defaults", "sigma_vector"]


def reward_head_defaults(use_proj_in: bool) -> dict[str, Any]:
    """The upstream query head of every family: width 1536, 4 queries, 8 heads (``proj_in`` when the tokens
    are wider than 1536)."""
    return {"use_proj_in": use_proj_in, "width": 1536, "out_dim": 1, "num_queries": 4, "num_attn_heads": 8,
            "dropout": 0.0}


def sigma_vector(sigma: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """``sigma`` (float, 0-d or ``(B,)``) as a float32 ``(B,)`` tensor on ``device``."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
        raise ValueError(f"sigma must be a float or a tensor, got {type(sigma).__name__}")
    s = torch.as_tensor(sigma, dtype=torch.float32).to(device)
    if s.ndim == 0:
        s = s.reshape(1)
    if s.ndim != 1 or s.shape[0] not in (1, batch):
        raise ValueError(f"sigma must be a scalar or shape ({batch},), got {tuple(s.shape)}")
    return s.expand(batch)


class BackboneAdapter(ABC):
    """Facts and calls of one model family (see the module docstring)."""

    #: Registry name (``sd3``, ``flux``, ``zimage``).
    name: ClassVar[str] = ""
    #: diffusers class names this adapter handles.
    pipeline_class_name: ClassVar[str] = ""
    transformer_class_name: ClassVar[str] = ""
    #: The model this family is usually trained from (recipes' default).
    default_model_id: ClassVar[str] = ""
    #: Lower-case hub-id prefixes of this family's models (the family is known before loading).
    hub_id_prefixes: ClassVar[tuple[str, ...]] = ()
    #: Policy LoRA targets (peft suffix match) and default rank / alpha.
    policy_lora_targets: ClassVar[tuple[str, ...]] = ()
    policy_lora_rank: ClassVar[int] = 32
    policy_lora_alpha: ClassVar[int] = 64
    #: Text length used to train the reward models of this family.
    default_max_sequence_length: ClassVar[int] = 128
    #: True when the pipeline's ``encode_prompt`` returns a list of variable-length tensors (Z-Image).
    variable_length_text: ClassVar[bool] = False

    # ------------------------------------------------------------------ identity
    def matches(self, obj: Any) -> bool:
        """True if ``obj`` is this family's pipeline or transformer (by class name, subclasses too)."""
        names = {c.__name__ for c in type(obj).__mro__}
        return self.pipeline_class_name in names or self.transformer_class_name in names

    def transformer_of(self, obj: Any) -> torch.nn.Module:
        """The transformer of a pipeline (or the transformer itself)."""
        return getattr(obj, "transformer", obj)

    # ------------------------------------------------------------------ loading
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def transformer_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.transformer_class_name)

    def load_pipeline(self, id_or_path: str | Path, torch_dtype: torch.dtype | None = None, **kwargs: Any) -> Any:
        """``<Pipeline>.from_pretrained`` with a ``FileNotFoundError`` naming the miss (offline, typo)."""
        from dinalrm_align.backbones.registry import dtype_kwargs

        try:
            pipe = self.pipeline_class().from_pretrained(str(id_or_path), **dtype_kwargs(torch_dtype), **kwargs)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"could not load the {self.pipeline_class_name} {str(id_or_path)!r}: {exc}. Pass a local folder or a "
                "hub id that is reachable (with HF_HUB_OFFLINE=1 only cached models load)."
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_transformer(self, model_id: str, torch_dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The transformer of ``model_id`` (subfolder ``transformer``), with a clear error on a miss."""
        from dinalrm_align.backbones.registry import dtype_kwargs

        try:
            return self.transformer_class().from_pretrained(model_id, subfolder="transformer", **dtype_kwargs(torch_dtype))
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"could not load the {self.transformer_class_name} of {model_id!r} (subfolder 'transformer'): {exc}. "
                "Pass transformer=pipe.transformer, or make the model available locally (HF_HUB_OFFLINE=1 only uses "
                "the cache)."
            ) from exc

    # ------------------------------------------------------------------ latents
    def latent_channels(self, transformer: torch.nn.Module) -> int:
        """Channels of the unpacked latent."""
        return int(transformer.config.in_channels)

    def latent_multiple(self, transformer: torch.nn.Module) -> int:
        """Latent height and width must be multiples of this (the patch size)."""
        return int(getattr(transformer.config, "patch_size", 2))

    def max_latent_side(self, transformer: torch.nn.Module) -> int | None:
        """Largest latent side the transformer can take (None: no hard limit)."""
        return None

    def vae_scale_factor(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1)))

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of a ``height x width`` image; ValueError if the size does not fit."""
        factor = self.vae_scale_factor(pipe)
        transformer = self.transformer_of(pipe)
        multiple = factor * self.latent_multiple(transformer)
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(
                f"{self.name}: image size {height}x{width} is not a positive multiple of {multiple} (VAE factor "
                f"{factor} x patch size {self.latent_multiple(transformer)})"
            )
        h, w = height // factor, width // factor
        limit = self.max_latent_side(transformer)
        if limit is not None and max(h, w) > limit:
            raise ValueError(
                f"{self.name}: image size {height}x{width} gives latents of {h}x{w}, larger than the transformer's "
                f"position grid ({limit} latent pixels a side, i.e. {limit * factor} image pixels)"
            )
        return self.latent_channels(transformer), h, w

    def latent_norm(self, vae: Any) -> tuple[float, float]:
        """``(shift, scale)`` with latent = ``(z_vae - shift) * scale``."""
        return float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)

    def check_latents(self, latents: Any, transformer: torch.nn.Module, name: str = "latents") -> torch.Tensor:
        """(B, C, h, w), the right channels, h/w multiples of the patch size and within the grid, finite."""
        from dinalrm_align.reward_model.validation import check_latents

        return check_latents(
            latents,
            in_channels=self.latent_channels(transformer),
            patch_size=self.latent_multiple(transformer),
            max_side=self.max_latent_side(transformer),
            name=name,
            backbone=self.name,
        )

    def unpack_pipeline_latents(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """What ``pipe(..., output_type="latent")`` returns -> unpacked ``(B, C, h, w)`` (identity by default)."""
        return latents

    @torch.no_grad()
    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` float32 in [0, 1] (no grad)."""
        vae = pipe.vae
        shift, scale = self.latent_norm(vae)
        z = latents.to(vae.device, vae.dtype) / scale + shift
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_pixels(
        self, vae: Any, pixels: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> normalised latents ``(B, C, h, w)`` float32 (keeps grad).

        ``sample``: draw from the VAE posterior (how the reward models were trained); False: its mean.
        """
        shift, scale = self.latent_norm(vae)
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return ((z - shift) * scale).float()

    # ------------------------------------------------------------------ text
    @abstractmethod
    def encode_prompt(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> tuple[Any, Any]:
        """Exactly what the pipeline's own ``encode_prompt`` returns at that length, as
        ``(prompt_embeds, pooled_prompt_embeds)`` (``pooled`` None where the family has none)."""

    @abstractmethod
    def conditioning(self, prompt_embeds: Any, pooled_prompt_embeds: Any = None) -> TextConditioning:
        """The family's native text outputs -> :class:`TextConditioning` (validated: ValueError on a mismatch)."""

    def check_conditioning(self, cond: TextConditioning, transformer: torch.nn.Module, batch: int) -> None:
        """ValueError if ``cond`` cannot condition ``transformer`` (widths from another family's encoder, ...)."""
        if len(cond) != batch:
            raise ValueError(f"batch sizes disagree: latents {batch}, prompt embeddings {len(cond)}")
        width = self.text_width(transformer)
        if cond.embeds.shape[-1] != width:
            raise ValueError(
                f"prompt_embeds width {cond.embeds.shape[-1]} does not fit the {self.name} transformer (expects "
                f"{width}): were they encoded by another backbone's text stack?"
            )
        pooled = self.pooled_width(transformer)
        if pooled is None and cond.pooled is not None:
            raise ValueError(f"the {self.name} backbone takes no pooled_prompt_embeds (got {tuple(cond.pooled.shape)})")
        if pooled is not None:
            if cond.pooled is None:
                raise ValueError(f"the {self.name} backbone needs pooled_prompt_embeds of width {pooled}")
            if cond.pooled.shape[-1] != pooled:
                raise ValueError(
                    f"pooled_prompt_embeds width {cond.pooled.shape[-1]} does not fit the {self.name} transformer "
                    f"(expects {pooled}): were they encoded by another backbone's text stack?"
                )

    @abstractmethod
    def text_width(self, transformer: torch.nn.Module) -> int:
        """Width D of ``TextConditioning.embeds`` the transformer takes."""

    def pooled_width(self, transformer: torch.nn.Module) -> int | None:
        """Width of the pooled text vector (None: the family has none)."""
        return None

    # ------------------------------------------------------------------ schedule
    def scheduler_kwargs(self, scheduler_config: Mapping[str, Any], image_seq_len: int) -> dict[str, Any]:
        """Extra ``set_timesteps`` arguments the pipeline passes (e.g. the resolution shift ``mu``)."""
        return {}

    def default_sigmas(self, num_steps: int) -> list[float] | None:
        """Explicit sigmas the pipeline passes to ``set_timesteps`` (None: the scheduler's own spacing)."""
        return None

    def inference_schedule(
        self,
        scheduler_config: Mapping[str, Any],
        num_steps: int,
        latent_hw: tuple[int, int],
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas (T + 1,), timesteps (T,))`` float32, exactly as the family's pipeline sets them.

        ``latent_hw``: unpacked latent size (resolution-dependent shifts use the image token count).
        """
        from dinalrm_align.sampling.schedule import scheduler_schedule

        h, w = latent_hw
        seq_len = (h // 2) * (w // 2)
        return scheduler_schedule(
            scheduler_config, num_steps, device=device, sigmas=self.default_sigmas(num_steps),
            **self.scheduler_kwargs(scheduler_config, seq_len),
        )

    # ------------------------------------------------------------------ hints before loading (preflight)
    def guidance_distilled_hint(self, model_id: str) -> bool | None:
        """Whether ``model_id`` is guidance-distilled, when known from the id alone (None: unknown)."""
        return False

    def resolution_multiple_hint(self, model_id: str) -> int | None:
        """Image sides must be multiples of this for ``model_id`` (None: unknown before loading)."""
        return None

    def pipeline_guidance_kwargs(self, guidance_scale: float, embedded_guidance: float | None) -> dict[str, float]:
        """Guidance arguments of the family's pipeline ``__call__`` that reproduce our sampler's settings
        (``guidance_scale`` in the standard CFG convention ``v_u + g (v_c - v_u)``, 1 = off)."""
        return {"guidance_scale": float(guidance_scale)}

    # ------------------------------------------------------------------ the transformer call
    def guidance_embedded(self, transformer: torch.nn.Module) -> bool:
        """True for guidance-distilled models (FLUX.1-dev): a guidance value is an input, CFG is not used."""
        return False

    @abstractmethod
    def velocity(
        self,
        transformer: Any,
        latents: torch.Tensor,
        sigma: float | torch.Tensor,
        cond: TextConditioning,
        *,
        guidance: float | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Velocity ``v = noise - x0`` ``(B, C, h, w)`` from ONE transformer forward at noise level ``sigma``.

        ``transformer`` may be wrapped (DDP, DeepSpeed, peft); gradients flow when enabled.
        ``guidance``: the embedded guidance of guidance-distilled models (ignored otherwise).
        """

    # ------------------------------------------------------------------ the reward model's tapped forward
    #: Block list the reward model's taps count (1-based) and truncates; lists it drops entirely.
    tap_list: ClassVar[str] = "transformer_blocks"
    dropped_lists: ClassVar[tuple[str, ...]] = ()
    #: Reward LoRA targets (peft suffix match) and the context-side projections of a dual-stream block.
    reward_lora_targets: ClassVar[tuple[str, ...]] = ()
    context_projections: ClassVar[tuple[str, ...]] = ()
    #: Model-section defaults of this family's reward model (the upstream configuration).
    reward_defaults: ClassVar[dict[str, Any]] = {}
    #: The family's flow-matching scheduler config (its sigma table is the one reward models look ``u`` up in).
    scheduler_defaults: ClassVar[dict[str, Any]] = {"num_train_timesteps": 1000, "shift": 3.0}
    #: Guidance value of guidance-distilled models (used by the reward model and as the sampler default).
    default_embedded_guidance: ClassVar[float | None] = None
    #: Modules of the transformer that never feed the reward head (output layers).
    unused_modules: ClassVar[tuple[str, ...]] = ("norm_out", "proj_out")

    def forward_kwargs(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, cond: TextConditioning, guidance: float | None = None
    ) -> dict[str, Any]:
        """Keyword arguments of the transformer's own ``forward`` at noise level ``sigma`` (the family's
        time convention, packing and text format); shared by :meth:`velocity` and the reward model."""
        raise NotImplementedError

    def temb_module(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """The module whose output is the embedding every block is modulated with (the head's FiLM input)."""
        return transformer.time_text_embed

    def token_dim(self, transformer: torch.nn.Module) -> int:
        """Width of the tapped tokens."""
        return int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)

    def temb_dim(self, transformer: torch.nn.Module) -> int:
        """Width of :meth:`temb_module`'s output."""
        return self.token_dim(transformer)

    def num_tap_blocks(self, transformer: torch.nn.Module) -> int:
        return len(getattr(transformer, self.tap_list))

    def tap_meta(self, latents: torch.Tensor, cond: TextConditioning) -> dict[str, Any]:
        """What :meth:`split_tap` needs to cut a block's output into image / text tokens."""
        return {}

    def split_tap(self, output: Any, meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A tapped block's output -> ``(image (B, N, D), text (B, L, D), text_mask (B, L) | None)``.

        Dual-stream blocks return ``(text, image)``.
        """
        text, image = output
        if text is None:
            raise ValueError("the tapped block produces no text stream (a context_pre_only block); tap an earlier one")
        return image, text, None

    def split_tap_input(self, args: tuple[Any, ...], kwargs: dict[str, Any], meta: dict[str, Any]) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Tap 0 (the embeddings before the first block) from the first block's inputs."""
        image = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return image, text, None

    def lora_exclusions(self, num_layers: int, text_taps: Sequence[int], use_text_features: bool) -> list[str] | None:
        """Reward-LoRA modules left out: the last kept block's context-side projections, whose output is
        never read unless text is tapped at that block (dual-stream families)."""
        if not self.context_projections:
            return None
        if use_text_features and len(text_taps) > 0 and text_taps[-1] == num_layers:
            return None
        return [f"{self.tap_list}.{num_layers - 1}.attn.{name}" for name in self.context_projections]

    # ------------------------------------------------------------------ misc
    def lora_targets(self, targets: Sequence[str] | str | None) -> list[str]:
        """Policy LoRA targets: ``None`` / ``"default"`` -> the family's defaults."""
        if targets is None or targets == "default" or list(targets) == ["default"]:
            return list(self.policy_lora_targets)
        return [str(t) for t in targets]

    def freeze_pipeline(self, pipe: Any, weight_dtype: torch.dtype) -> Any:
        """Frozen, eval-mode pipeline: transformer and text encoders in ``weight_dtype``, the VAE in fp32."""
        for name, module in pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            dtype = torch.float32 if name == "vae" else weight_dtype
            if any(p.dtype != dtype for p in module.parameters()):
                module.to(dtype=dtype)
            module.requires_grad_(False).eval()
        with contextlib.suppress(AttributeError):
            pipe.set_progress_bar_config(disable=True)
        return pipe
