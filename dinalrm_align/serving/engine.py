"""The scoring engine behind the server: model-specific checks and merged-batch scoring.

It wraps a :class:`~dinalrm_align.rewards.dinalrm.DiNaLatentReward`, so a remote score equals a
local one given the same seeds, u, n_noise and inputs (up to float batching effects).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from dinalrm_align.reward_model import validation
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
        bb = reward.model.backbone
        self.in_channels = int(bb.in_channels)
        self.patch_size = int(bb.patch_size)
        self.pos_embed_max_size = bb.pos_embed_max_size
        self.joint_attention_dim = int(bb.joint_attention_dim)
        self.pooled_projection_dim = int(bb.pooled_projection_dim)

    # ------------------------------------------------------------------ checks (request thread)
    def validate(self, req: ScoreRequest) -> None:
        """Raise :class:`PayloadError` (422) if the request does not fit the model."""
        try:
            validation.check_latents(
                req.latents,
                in_channels=self.in_channels,
                patch_size=self.patch_size,
                pos_embed_max_size=self.pos_embed_max_size,
            )
            if req.prompt_embeds is not None:
                validation.check_text_conditions(
                    req.prompt_embeds,
                    req.pooled_prompt_embeds,
                    batch_size=req.batch_size,
                    joint_attention_dim=self.joint_attention_dim,
                    pooled_projection_dim=self.pooled_projection_dim,
                )
        except ValueError as exc:
            raise PayloadError(str(exc)) from exc
        if req.prompts is not None and not self.reward.has_text_stack:
            raise PayloadError("this server has no text encoders: send prompt_embeds + pooled_prompt_embeds")

    def group_key(self, req: ScoreRequest) -> Hashable:
        """Requests with equal keys can be concatenated into one forward pass."""
        text = "prompts" if req.prompts is not None else int(req.prompt_embeds.shape[1])  # type: ignore[union-attr]
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
        pe = pooled = None
        if prompts is None:
            pe = torch.cat([r.prompt_embeds for r in requests])  # type: ignore[misc]
            pooled = torch.cat([r.pooled_prompt_embeds for r in requests])  # type: ignore[misc]
        total = latents.shape[0]
        step = total if max_rows is None else max(1, max_rows)
        parts = []
        for start in range(0, total, step):
            rows = slice(start, start + step)
            parts.append(
                self.reward.score_raw(
                    latents=latents[rows].to(self.reward.model.device),
                    prompt_embeds=pe[rows] if pe is not None else None,
                    pooled_prompt_embeds=pooled[rows] if pooled is not None else None,
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
            "latent_channels": self.in_channels,
            "max_latent_size": (self.pos_embed_max_size or 0) * self.patch_size or None,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
        }
