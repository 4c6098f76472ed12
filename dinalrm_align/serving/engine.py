"""The scoring engine behind the server: model-specific checks and merged-batch scoring.

It wraps a :class:`~dinalrm_align.rewards.dinalrm.DiNaLatentReward`, so a remote score equals a
local one given the same seeds, u, n_noise and inputs (up to float batching effects).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from dinalrm_align.backbones.conditioning import TextConditioning
from dinalrm_align.rewards.dinalrm import DiNaLatentReward
from dinalrm_align.serving.wire import PayloadError, ScoreRequest


class ScoringEngine:
    """Validate requests against the model and score merged batches.

    Args:
        reward: the local reward (its ``u``/``n_noise`` are the defaults of a request; its
            normalisation is the one reported as ``score``).
        model_id, pipeline_id: what ``/info`` reports.
    """

    def __init__(self, reward: DiNaLatentReward, *, model_id: str, pipeline_id: str) -> None:
        self.reward = reward
        self.model_id = model_id
        self.pipeline_id = pipeline_id
        model = reward.model
        self.adapter = model.adapter
        self.backbone = model.backbone
        self.in_channels = int(self.adapter.latent_channels(model.backbone))
        self.patch_size = int(self.adapter.latent_multiple(model.backbone))
        self.max_latent_side = self.adapter.max_latent_side(model.backbone)
        self.text_width = int(self.adapter.text_width(model.backbone))
        self.pooled_width = self.adapter.pooled_width(model.backbone)

    # ------------------------------------------------------------------ checks (request thread)
    @property
    def requires_pooled(self) -> bool:
        """Whether embedding requests must carry ``pooled_prompt_embeds`` (SD3.5 and FLUX.1: yes)."""
        return self.pooled_width is not None

    @staticmethod
    def conditioning(req: ScoreRequest) -> TextConditioning | None:
        """The request's text embeddings as a :class:`TextConditioning` (None for prompt requests)."""
        if req.prompt_embeds is None:
            return None
        mask = req.prompt_embeds_mask
        if mask is not None and bool(mask.all()):
            mask = None
        return TextConditioning(req.prompt_embeds, req.pooled_prompt_embeds, mask)

    def validate(self, req: ScoreRequest) -> None:
        """Raise :class:`PayloadError` (422) if the request does not fit the model."""
        if req.prompt_embeds is not None and req.pooled_prompt_embeds is None and self.requires_pooled:
            raise PayloadError(
                f"this {self.adapter.name} model needs both prompt_embeds and pooled_prompt_embeds (or prompts instead)"
            )
        mask = req.prompt_embeds_mask
        if mask is not None and not self.adapter.variable_length_text and not bool(mask.all()):
            raise PayloadError(
                f"this {self.adapter.name} model reads every text token (fixed-length text): prompt_embeds_mask may "
                "not mark padding; it is for variable-length text (Z-Image)"
            )
        try:
            self.adapter.check_latents(req.latents, self.backbone)
            cond = self.conditioning(req)
            if cond is not None:
                self.adapter.check_conditioning(cond, self.backbone, req.batch_size)
        except ValueError as exc:
            raise PayloadError(str(exc)) from exc
        if req.prompts is not None and not self.reward.has_text_stack:
            raise PayloadError("this server has no text encoders: send prompt_embeds (and pooled_prompt_embeds)")

    def group_key(self, req: ScoreRequest) -> Hashable:
        """Requests with equal keys can be concatenated into one forward pass."""
        if req.prompts is not None:
            text: Hashable = "prompts"
        else:
            text = (int(req.prompt_embeds.shape[1]), req.pooled_prompt_embeds is not None,  # type: ignore[union-attr]
                    req.prompt_embeds_mask is not None)
        return (tuple(req.latents.shape[1:]), self.u_of(req), self.n_noise_of(req), text)

    def u_of(self, req: ScoreRequest) -> float:
        return self.reward.u if req.u is None else req.u

    def n_noise_of(self, req: ScoreRequest) -> int:
        return self.reward.n_noise if req.n_noise is None else req.n_noise

    # ------------------------------------------------------------------ scoring (worker thread)
    @torch.no_grad()
    def score_batch(
        self, requests: Sequence[ScoreRequest], max_rows: int | None = None
    ) -> list[torch.Tensor]:
        """Raw scores (B_i,) float32 for each request of one group.

        The group's rows are concatenated and scored in forward passes of at most ``max_rows``
        rows (all at once if ``None``); per-sample seeds make the result independent of the split.
        """
        first = requests[0]
        latents = torch.cat([r.latents for r in requests])
        seeds = [s for r in requests for s in r.seeds]
        prompts = [p for r in requests for p in r.prompts] if first.prompts is not None else None  # type: ignore[union-attr]
        cond = None
        if prompts is None:
            cond = TextConditioning.cat([self.conditioning(r) for r in requests])  # type: ignore[misc]
        total = latents.shape[0]
        step = total if max_rows is None else max(1, max_rows)
        parts = []
        for start in range(0, total, step):
            rows = slice(start, start + step)
            parts.append(
                self.reward.score_raw(
                    latents=latents[rows].to(self.reward.model.device),
                    prompt_embeds=cond[rows] if cond is not None else None,
                    prompts=prompts[rows] if prompts is not None else None,
                    seeds=seeds[rows],
                    u=self.u_of(first),
                    n_noise=self.n_noise_of(first),
                ).cpu()
            )
        return list(torch.split(torch.cat(parts), [r.batch_size for r in requests]))

    def sigma_of(self, u: float) -> float:
        return float(self.reward.model.sigma_for(u)[0][0])

    def info(self) -> dict[str, Any]:
        model = self.reward.model
        return {
            "model": self.model_id,
            "pipeline": self.pipeline_id,
            "dtype": str(model.dtype).replace("torch.", ""),
            "device": str(model.device),
            "u": self.reward.u,
            "sigma": self.sigma_of(self.reward.u),
            "n_noise": self.reward.n_noise,
            "normalization": self.reward.normalization.as_dict(),
            "max_sequence_length": self.reward.max_sequence_length,
            "text_encoders": self.reward.has_text_stack,
            "backbone": self.adapter.name,
            "latent_channels": self.in_channels,
            "latent_multiple": self.patch_size,
            "max_latent_size": self.max_latent_side,
            "text_width": self.text_width,
            "pooled_width": self.pooled_width,
            "variable_length_text": self.adapter.variable_length_text,
        }
