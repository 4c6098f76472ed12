"""PickScore: an image-text preference reward on decoded images (the paper's mix-in and proxy metric).

PickScore (Kirstain et al., 2023) is a CLIP-H model fine-tuned on Pick-a-Pic preferences. The
score of an image and its prompt is ::

    pickscore = logit_scale.exp() * cos(image_embedding, text_embedding)        # ~ 18 .. 23 for SD images

with the processor (tokenizer + image preprocessing) of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
and the model ``yuvalkirstain/PickScore_v1`` (a transformers ``CLIPModel``). Two uses here:

* **GRPO mix-in**: the DiNa-LRM GRPO recipe adds ``0.2 x`` the per-prompt-normalised PickScore
  advantage to the DiNa-LRM advantage (``algorithm.extra_rewards`` + ``reward_weights``,
  ``advantage_mode: per_component``);
* **proxy / golden metric**: ReFL logs PickScore on decoded eval images next to the latent reward to
  spot reward hacking (``eval.proxy_rewards``).

Entry points:

* :func:`make_pickscore` (``factory: true`` target of both config lists) returns a
  :class:`PickScore` scorer: ``scorer(images, prompts, metadata=None, **ignored) -> (B,)`` float32
  on the CPU, no grad;
* :class:`PickScoreLatentReward`: the same on SD3 latents (decoded with the pipeline's VAE), a
  latent reward for :func:`~dinalrm_align.rewards.build_composite` (built-in type ``"pickscore"``).

``scale`` multiplies the score. Its default ``1/26`` is Flow-GRPO's ``pickscore`` reward (which
divides by 26, mapping typical values to ~0.7 .. 0.9); ``scale=1`` gives the raw PickScore the papers
report (DiNa-LRM's "golden score" ~ 19.9 -> 21.2). Per-group GRPO advantages do not depend on it.

Preprocessing is done in torch (no torchvision, no PIL round trip, on the scorer's device):
optionally quantise to 8-bit levels (``quantize=True``: what Flow-GRPO's uint8 conversion and a saved
PNG see), resize the shortest side to the processor's ``size`` with antialiased bicubic (PIL's
filter), centre-crop to ``crop_size`` (HF's offsets) and normalise with the processor's
``image_mean`` / ``image_std``. Prompts go through the processor's tokenizer (padding, truncation to
77 tokens). Each distinct prompt of a call is encoded once (GRPO groups repeat prompts).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dinalrm_align.rewards.pickscore_io import (
    RANGE_TOL,
    center_crop,
    clip_features,
    image_settings,
    load_model,
    load_processor,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PROCESSOR",
    "FLOW_GRPO_SCALE",
    "PickScore",
    "PickScoreLatentReward",
    "make_pickscore",
]

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
#: Flow-GRPO divides PickScore by 26.
FLOW_GRPO_SCALE = 1.0 / 26.0
#: CLIP's text context.
MAX_TEXT_TOKENS = 77



# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------


class PickScore:
    """PickScore of decoded images against their prompts (build with :func:`make_pickscore`).

    Call: ``scorer(images, prompts, metadata=None, **ignored) -> (B,)`` float32 on the CPU, no grad.
    ``images``: float ``(B, 3, H, W)`` in [0, 1] (any H, W; uint8 ``(B, 3, H, W)`` is read as /255);
    ``prompts``: B strings; ``metadata`` and extra keywords (e.g. Flow-GRPO's ``only_strict``) are ignored.

    Attributes:
        model: the CLIP model (frozen, eval mode, on :attr:`device` in :attr:`dtype`).
        processor: its processor (tokenizer + image-processor config).
        scale: multiplier of the score (1/26 by default, as Flow-GRPO).
        batch_size: images per forward.
        quantize: round images to 8-bit levels before preprocessing.
    """

    name = "pickscore"

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        scale: float = FLOW_GRPO_SCALE,
        batch_size: int = 16,
        quantize: bool = True,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or scale == 0
        ):
            raise ValueError(f"scale must be a finite non-zero number, got {scale!r}")
        missing = [
            a for a in ("get_image_features", "get_text_features", "logit_scale") if not hasattr(model, a)
        ]
        if missing:
            raise ValueError(
                f"the PickScore model must be a CLIPModel; {type(model).__name__} lacks {missing}"
            )
        self.settings = image_settings(processor)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.scale = float(scale)
        self.batch_size = batch_size
        self.quantize = bool(quantize)

    def __repr__(self) -> str:
        return (
            f"PickScore(model={type(self.model).__name__}, device={self.device}, dtype={self.dtype}, "
            f"scale={self.scale:g}, batch_size={self.batch_size})"
        )

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def check_inputs(images: Any, prompts: Any) -> tuple[torch.Tensor, list[str]]:
        """Validate and return ``(images float (B, 3, H, W) in [0, 1], prompts list)``; ValueError otherwise."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(
                f"images must be a torch.Tensor (B, 3, H, W) with values in [0, 1], got {type(images).__name__}"
            )
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must have shape (B, 3, H, W) (channels first, RGB), got {tuple(images.shape)}"
            )
        if images.shape[2] < 1 or images.shape[3] < 1:
            raise ValueError(f"images have an empty side: {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1] (or uint8), got {images.dtype}")
        images = images.detach().float()
        if images.numel():
            if not bool(torch.isfinite(images).all()):
                raise ValueError("images contain NaN or inf")
            lo, hi = float(images.min()), float(images.max())
            if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
                hint = " (images in [-1, 1]? pass (images + 1) / 2)" if lo >= -1 - RANGE_TOL else ""
                raise ValueError(f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(
                f"prompts must be a list of strings (one per image), got {type(prompts).__name__}"
            )
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
        return images.clamp(0.0, 1.0), prompts

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] -> normalised pixel values (B, 3, h, w) float32 on :attr:`device`.

        8-bit quantisation (if enabled), shortest-side resize (antialiased, the processor's filter),
        centre crop (top/left = (size - crop) // 2, zero padding if the image is smaller) and
        ``(x - mean) / std``.
        """
        s = self.settings
        x = images.to(self.device, torch.float32)
        if self.quantize:
            x = torch.round(x * 255.0) / 255.0
        h, w = x.shape[-2:]
        target: tuple[int, int] | None = None
        if s["shortest_edge"] is not None:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = s["shortest_edge"], int(s["shortest_edge"] * long / short)
            target = (new_long, new_short) if w <= h else (new_short, new_long)
        elif s["resize_hw"] is not None:
            target = s["resize_hw"]
        if target is not None and tuple(target) != (h, w):
            mode = s["mode"]
            kwargs: dict[str, Any] = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
            x = F.interpolate(x, size=tuple(target), mode=mode, **kwargs).clamp(0.0, 1.0)
        if s["crop_hw"] is not None:
            x = center_crop(x, s["crop_hw"])
        if s["mean"] is not None and s["std"] is not None:
            mean = torch.tensor(s["mean"], device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(s["std"], device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask (padded to the longest, truncated to 77) on :attr:`device`."""
        max_len = min(
            MAX_TEXT_TOKENS,
            int(getattr(self.tokenizer, "model_max_length", MAX_TEXT_TOKENS) or MAX_TEXT_TOKENS),
        )
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, D) float32 of preprocessed pixels."""
        out = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        return F.normalize(clip_features(out).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, D) float32 of prompts."""
        out = self.model.get_text_features(**self.tokenize(prompts))
        return F.normalize(clip_features(out).float(), dim=-1)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Any = None,
        **_: Any,
    ) -> torch.Tensor:
        """``scale * logit_scale.exp() * cos(image, prompt)`` per image: (B,) float32 on the CPU."""
        images, prompts = self.check_inputs(images, prompts)
        b = images.shape[0]
        if b == 0:
            return torch.zeros(0, dtype=torch.float32)
        logit = float(self.model.logit_scale.detach().float().exp())
        scores = []
        for start in range(0, b, self.batch_size):
            chunk = slice(start, start + self.batch_size)
            img = self.image_embeddings(self.preprocess(images[chunk]))
            unique = list(dict.fromkeys(prompts[chunk]))
            txt = self.text_embeddings(unique)
            rows = torch.tensor([unique.index(p) for p in prompts[chunk]], device=txt.device)
            scores.append((img * txt[rows]).sum(dim=-1))
        return (torch.cat(scores) * (logit * self.scale)).float().cpu()


def make_pickscore(
    model: str | os.PathLike | torch.nn.Module = DEFAULT_MODEL,
    processor: str | os.PathLike | Any = DEFAULT_PROCESSOR,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    scale: float = FLOW_GRPO_SCALE,
    batch_size: int = 16,
    quantize: bool = True,
) -> PickScore:
    """Load PickScore once and return the scorer ``fn(images, prompts, metadata=None, **kw) -> (B,)``.

    Args:
        model: hub id or local folder of the CLIP model (``transformers.AutoModel``), or a loaded
            ``CLIPModel`` (moved to ``device`` / cast to ``dtype`` in place). Default ``yuvalkirstain/PickScore_v1``.
        processor: hub id or local folder of the processor (``transformers.AutoProcessor``: tokenizer
            + image-processor config), or a loaded one. Default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
        device: where the model runs; ``None``: this process' GPU (``LOCAL_RANK``) if any, else CPU.
        dtype: model weights dtype (``float32`` / ``bfloat16`` / ``float16``); similarities are float32.
        scale: multiplier of the score. ``1/26`` (default) is Flow-GRPO's ``pickscore`` reward;
            ``1.0`` is the raw PickScore of the papers.
        batch_size: images per forward pass.
        quantize: round images to 8-bit levels first (as a saved image / Flow-GRPO's uint8 path).

    Raises:
        FileNotFoundError: a local folder does not exist, or an id is neither cached nor downloadable
            (the message names it and mentions ``HF_HUB_OFFLINE``).
        ValueError: a bad option, or a model / processor that is not CLIP's.

    The returned scorer fits ``eval.proxy_rewards`` and GRPO's ``algorithm.extra_rewards`` with
    ``target: dinalrm_align.rewards.pickscore:make_pickscore``, ``factory: true``, ``inputs: images``.
    """
    dtype_ = resolve_dtype(dtype)  # option errors before any loading
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    proc = load_processor(processor)
    clip = load_model(model)
    return PickScore(
        clip, proc, device=device, dtype=dtype_, scale=scale, batch_size=batch_size, quantize=quantize
    )


# ----------------------------------------------------------------------------------------------
# Latent reward (composition)
# ----------------------------------------------------------------------------------------------


class PickScoreLatentReward:
    """PickScore on SD3 latents: VAE-decode with ``pipeline`` (no grad), then :class:`PickScore`.

    A latent reward (``dinalrm_align.rewards.protocol``) for :class:`~dinalrm_align.rewards.CompositeReward`
    and :func:`~dinalrm_align.rewards.build_composite` (type ``"pickscore"``; ``pipeline`` and
    ``device`` come from the build context). Requires ``latents`` and ``prompts``; scores are float32
    on the latents' device. Not differentiable. Loading options are those of :func:`make_pickscore`,
    or pass a ready ``scorer``.
    """

    required_fields: tuple[str, ...] = ("latents", "prompts")
    optional_fields: tuple[str, ...] = ("metadata",)

    def __init__(
        self,
        pipeline: Any,
        *,
        name: str = "pickscore",
        scorer: PickScore | None = None,
        model: str | os.PathLike | torch.nn.Module = DEFAULT_MODEL,
        processor: str | os.PathLike | Any = DEFAULT_PROCESSOR,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        scale: float = FLOW_GRPO_SCALE,
        batch_size: int = 16,
        quantize: bool = True,
    ) -> None:
        if pipeline is None or getattr(pipeline, "vae", None) is None:
            raise ValueError(
                "PickScore on latents needs the SD3 pipeline (its VAE decodes the latents): pipeline=..."
            )
        self.name = name
        self.pipeline = pipeline
        self.scorer = (
            scorer
            if scorer is not None
            else make_pickscore(
                model,
                processor,
                device=device,
                dtype=dtype,
                scale=scale,
                batch_size=batch_size,
                quantize=quantize,
            )
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """SD3-normalised latents (B, 16, h, w) -> images (B, 3, H, W) float32 in [0, 1] on the VAE's device."""
        vae = self.pipeline.vae
        out = []
        for start in range(0, latents.shape[0], self.scorer.batch_size):
            z = latents[start : start + self.scorer.batch_size].to(vae.device, vae.dtype)
            z = z / vae.config.scaling_factor + vae.config.shift_factor
            out.append((vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(
        self,
        *,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        """(B,) float32 PickScores of the decoded latents on the latents' device."""
        from dinalrm_align.rewards import protocol as P

        b = P.batch_size_of(latents)
        if prompts is None:
            raise ValueError(
                f"reward {self.name!r} needs the prompt strings (prompts=...); embeddings are not enough"
            )
        prompts = P.check_prompts(prompts, b)
        return self.scorer(self.decode(latents), prompts).to(latents.device)

    def __repr__(self) -> str:
        return f"PickScoreLatentReward(name={self.name!r}, scorer={self.scorer!r})"
