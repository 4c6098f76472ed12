"""``DiNaLatentReward``: the local DiNa-LRM reward in the latent-reward protocol.

Wraps a :class:`~dinalrm_align.reward_model.model.LatentRewardModel` with everything a trainer
should not have to think about: prompt encoding (cached), per-sample seeded re-noising
(:mod:`~dinalrm_align.rewards.seeding`), an explicit normalisation
(:mod:`~dinalrm_align.rewards.normalization`) and a lock (safe to call from a trainer's reward
thread pool).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.backbones.conditioning import TextConditioning
from dinalrm_align.rewards import protocol as P
from dinalrm_align.rewards.normalization import ScoreNormalization, resolve_normalization
from dinalrm_align.rewards.seeding import NoiseSeeding, batch_seeds, noise_from_seeds


def resolve_pipeline(
    pipeline: Any, *, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> Any:
    """A loaded pipeline (SD3.5, FLUX.1 or Z-Image): ``pipeline`` itself, or loaded from a tiny id, a hub id
    or a folder."""
    if isinstance(pipeline, (str, Path)):
        from dinalrm_align.backbones.loading import load_any_pipeline

        pipe, adapter = load_any_pipeline(str(pipeline), torch_dtype=torch_dtype, what="pipeline")
        adapter.freeze_pipeline(pipe, torch_dtype or torch.float32)
        return pipe.to(device) if device is not None else pipe
    return pipeline


def _has_text_stack(pipeline: Any) -> bool:
    return all(getattr(pipeline, n, None) is not None for n in ("text_encoder", "tokenizer"))


def _check_same_family(model: Any, pipeline: Any) -> None:
    """ValueError when ``pipeline`` is a supported pipeline of another family than the reward model."""
    from dinalrm_align.backbones.registry import adapter_for

    adapter = getattr(model, "adapter", None)
    if adapter is None:
        return
    try:
        family = adapter_for(pipeline).name
    except ValueError:  # not a supported pipeline class: its text stack / VAE are used as they are
        return
    if family != adapter.name:
        raise ValueError(
            f"the reward model is a {adapter.name} model but the pipeline is a {type(pipeline).__name__} ({family}): "
            f"pass the {adapter.name} pipeline (its text encoders and VAE produce what the model reads)"
        )


def key_embeddings(cond: TextConditioning) -> torch.Tensor:
    """Per-sample vectors that identify the text (seeds without prompt strings): the pooled vector, or the
    masked mean of the tokens for families without one."""
    if cond.pooled is not None:
        return cond.pooled
    mask = cond.token_mask().to(cond.embeds.dtype).unsqueeze(-1)
    return (cond.embeds * mask).sum(1) / mask.sum(1).clamp_min(1)


class DiNaLatentReward:
    """DiNa-LRM as a :class:`~dinalrm_align.rewards.protocol.DifferentiableLatentReward`.

    Args:
        model: the reward model (its device/dtype are used; it is not moved).
        pipeline: optional pipeline of the reward model's family; its text stack encodes ``prompts`` and
            its VAE serves the pixel bridge. Without it the reward needs ``prompt_embeds`` (and, for SD3.5 /
            FLUX, ``pooled_prompt_embeds``; Z-Image has no pooled vector).
        name: key of this reward in composed outputs.
        u: noise level sigma in [0, 1] the clean latents are re-noised to (0.4 for generated latents,
            0.1 for encoded real images).
        n_noise: average over this many noise draws per sample.
        normalization: ``"display"`` ((raw+10)/10, default), ``"fork"`` ((raw+12)/10), ``"raw"``,
            ``"model"`` (checkpoint's), ``(offset, scale)`` or a :class:`ScoreNormalization`.
        seeding: per-sample noise seeding (default ``NoiseSeeding("prompt", 0)``).
        max_sequence_length: text length used to encode prompts (128 = DiNa-LRM training).
        prompt_cache_size: size of the LRU prompt-embedding cache (0 disables it).
    """

    def __init__(
        self,
        model: Any,
        pipeline: Any | None = None,
        *,
        name: str = "dinalrm",
        u: float = 0.4,
        n_noise: int = 1,
        normalization: Any = "display",
        seeding: NoiseSeeding | None = None,
        max_sequence_length: int = 128,
        prompt_cache_size: int = 4096,
    ) -> None:
        from dinalrm_align.reward_model import validation
        from dinalrm_align.reward_model.text import PromptEmbeddingCache

        (self.u,) = validation.check_noise_levels(u)
        if isinstance(n_noise, bool) or not isinstance(n_noise, int) or n_noise < 1:
            raise ValueError(f"n_noise must be a positive integer, got {n_noise!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if pipeline is not None:
            from dinalrm_align.reward_model.text import private_tokenizers

            _check_same_family(model, pipeline)
            # trainers keep encoding with the same pipeline in their own thread: tokenizers are not thread-safe
            pipeline = private_tokenizers(pipeline)
        self.model = model
        self.pipeline = pipeline
        self.name = name
        self.n_noise = n_noise
        self.normalization: ScoreNormalization = resolve_normalization(normalization, model)
        self.seeding = seeding if seeding is not None else NoiseSeeding()
        self.max_sequence_length = max_sequence_length
        self.step = 0
        self._cache = PromptEmbeddingCache(prompt_cache_size) if prompt_cache_size > 0 else None
        self._lock = threading.RLock()
        self.has_text_stack = pipeline is not None and _has_text_stack(pipeline)
        adapter = getattr(model, "adapter", None)
        #: Whether the family has a pooled text vector (SD3.5, FLUX.1: yes; Z-Image: no).
        self.pooled_text = adapter is None or adapter.pooled_width(model.backbone) is not None
        embeddings = P.TEXT_EMBEDDINGS if self.pooled_text else (P.PROMPT_EMBEDS,)
        if self.has_text_stack:  # prompts are encoded here; given embeddings are used as they are
            self.required_fields: tuple[str, ...] = (P.LATENTS, P.TEXT if self.pooled_text else P.TEXT_UNPOOLED)
            self.optional_fields: tuple[str, ...] = (P.PROMPTS, *embeddings, P.METADATA)
        else:
            self.required_fields = (P.LATENTS, *embeddings)
            self.optional_fields = (P.PROMPTS, P.METADATA)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        pipeline: Any | str | Path,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        share_base_weights: bool = False,
        **kwargs: Any,
    ) -> DiNaLatentReward:
        """Load the reward model (hub id, folder or tiny id) on ``pipeline``'s transformer.

        ``pipeline`` is a loaded pipeline of the reward model's family (it may be the policy's: the reward
        copies the first blocks and strips any policy LoRA from its copy) or a tiny id / hub id / folder
        to load one from. ``kwargs`` go to the constructor (``u``, ``normalization``, ``seeding`` ...).
        """
        from dinalrm_align.reward_model.model import LatentRewardModel

        pipeline = resolve_pipeline(pipeline, torch_dtype=torch_dtype, device=device)
        model = LatentRewardModel.from_pretrained(
            model_id_or_path,
            transformer=pipeline.transformer,
            torch_dtype=torch_dtype,
            device=device,
            share_base_weights=share_base_weights,
            scheduler_config=getattr(getattr(pipeline, "scheduler", None), "config", None),
        )
        return cls(model, pipeline, **kwargs)

    # ------------------------------------------------------------------ helpers
    def set_step(self, step: int) -> None:
        """Mix ``step`` (e.g. the epoch) into the derived seeds so the noise changes between epochs."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.step = step

    def conditions(
        self,
        batch_size: int,
        prompt_embeds: Any,
        pooled_prompt_embeds: torch.Tensor | None,
        prompts: Sequence[str] | None,
    ) -> TextConditioning:
        """Text conditioning (:class:`TextConditioning`) on the model's device: the given embeddings, or
        ``prompts`` encoded with the pipeline's text stack."""
        if prompt_embeds is None:
            if pooled_prompt_embeds is not None:
                raise ValueError("pooled_prompt_embeds was given without prompt_embeds")
            if prompts is None:
                raise ValueError(f"reward {self.name!r} needs prompts or prompt_embeds (+ pooled_prompt_embeds)")
            if not self.has_text_stack:
                raise ValueError(
                    f"reward {self.name!r} has no text encoders (built without a pipeline): pass prompt_embeds "
                    "(and pooled_prompt_embeds for SD3.5 / FLUX; Z-Image has none)"
                )
            prompts = P.check_prompts(prompts, batch_size)
            from dinalrm_align.reward_model.text import encode_conditioning

            cond = encode_conditioning(self.pipeline, prompts, self.max_sequence_length, cache=self._cache)
        else:
            cond = self.model.conditioning(prompt_embeds, pooled_prompt_embeds)
        if len(cond) != batch_size:
            raise ValueError(f"got {batch_size} latents but {len(cond)} prompt embeddings")
        return cond.to(device=self.model.device)

    def seeds_for(
        self,
        batch_size: int,
        prompts: Sequence[str] | None,
        key_embeds: torch.Tensor | None,
        metadata: Sequence[Mapping[str, Any]] | None,
    ) -> list[int]:
        """Per-sample noise seeds (:func:`~dinalrm_align.rewards.seeding.batch_seeds`); ``key_embeds`` (B, D)
        identify the texts when no prompt strings are given."""
        return batch_seeds(
            self.seeding,
            batch_size=batch_size,
            prompts=prompts,
            pooled_prompt_embeds=key_embeds,
            metadata=metadata,
            step=self.step,
        )

    def score_raw(
        self,
        *,
        latents: torch.Tensor,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        seeds: Sequence[int] | None = None,
        u: float | None = None,
        n_noise: int | None = None,
    ) -> torch.Tensor:
        """Raw reward (B,) float32 on ``latents``' device; gradients follow the caller's grad mode.

        ``seeds`` (B ints) override the seeding policy; ``u``/``n_noise`` override the defaults.
        """
        b = P.batch_size_of(latents)
        n = self.n_noise if n_noise is None else n_noise
        with self._lock:
            cond = self.conditions(b, prompt_embeds, pooled_prompt_embeds, prompts)
            if seeds is None:
                seeds = self.seeds_for(b, prompts, key_embeddings(cond), metadata)
            elif len(seeds) != b:
                raise ValueError(f"got {b} latents but {len(seeds)} seeds")
            device = self.model.device
            noise = noise_from_seeds(seeds, latents.shape[1:], n_noise=n, dtype=latents.dtype, device=device)
            raw = self.model.score_conditioning(latents.to(device), cond, u=self.u if u is None else u,
                                                noise=noise, n_noise=n)
        return raw.float().to(latents.device)

    # ------------------------------------------------------------------ protocol
    def __call__(
        self,
        *,
        latents: torch.Tensor,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Normalised reward (B,) float32, no gradients."""
        with torch.no_grad():
            raw = self.score_raw(
                latents=latents,
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                prompts=prompts,
                metadata=metadata,
            )
        return self.normalization(raw)

    def score_differentiable(
        self,
        *,
        latents: torch.Tensor,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Normalised reward (B,) float32 with gradients w.r.t. ``latents`` (ReFL / DRaFT)."""
        with torch.enable_grad():
            raw = self.score_raw(
                latents=latents,
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                prompts=prompts,
                metadata=metadata,
            )
        return self.normalization(raw)

    def describe(self) -> dict[str, Any]:
        """Settings for logs: backbone, u, sigma actually used, n_noise, normalisation, seeding."""
        sigma = float(self.model.sigma_for(self.u)[0][0])
        return {
            "name": self.name,
            "backbone": getattr(getattr(self.model, "adapter", None), "name", None),
            "u": self.u,
            "sigma": sigma,
            "n_noise": self.n_noise,
            "normalization": self.normalization.as_dict(),
            "seeding": {"mode": self.seeding.mode, "base_seed": self.seeding.base_seed, "step": self.step},
            "max_sequence_length": self.max_sequence_length,
        }

    def __repr__(self) -> str:
        return (
            f"DiNaLatentReward(name={self.name!r}, u={self.u}, n_noise={self.n_noise}, "
            f"normalization={self.normalization.name!r}, seeding={self.seeding})"
        )
