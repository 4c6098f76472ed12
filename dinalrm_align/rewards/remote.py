"""``RemoteLatentReward``: a latent reward served by ``dinalrm-align serve``.

It speaks the same protocol as the local reward and plugs into :class:`CompositeReward`, but
it is never differentiable (autograd cannot cross the wire): it has no ``score_differentiable``.
Seeds are derived on the client with the same :class:`~dinalrm_align.rewards.seeding.NoiseSeeding`
as the local reward and sent explicitly, and the normalisation is applied on the client from
the raw scores, so a remote and a local reward with the same settings return the same scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from dinalrm_align.rewards import protocol as P
from dinalrm_align.rewards.normalization import ScoreNormalization, resolve_normalization
from dinalrm_align.rewards.seeding import NoiseSeeding, batch_seeds


class RemoteLatentReward:
    """Latent reward over HTTP.

    Args:
        url: the server's base URL (``http://127.0.0.1:8000``).
        name: key in composed outputs.
        send: ``"embeddings"`` (binary safetensors; the trainer's embeddings), ``"prompts"`` (the
            server encodes the text) or ``"auto"`` (embeddings when given, else prompts).
        u, n_noise: per-request overrides (default: the server's).
        normalization: applied to the raw scores on the client (default ``"display"``).
        seeding: per-sample noise seeding (default ``NoiseSeeding("prompt", 0)``).
        timeout: seconds per request.
        token: bearer token of a server started with one (default: ``$DINALRM_SERVER_TOKEN``).
        client: an existing :class:`~dinalrm_align.serving.client.RewardClient` (else one is made).
        pooled_text: whether the server's model family has a pooled text vector (SD3.5, FLUX.1: True;
            Z-Image: False, see ``/info``'s ``pooled_width``); it only sets the declared fields.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        name: str = "dinalrm_remote",
        send: Literal["auto", "embeddings", "prompts"] = "auto",
        u: float | None = None,
        n_noise: int | None = None,
        normalization: Any = "display",
        seeding: NoiseSeeding | None = None,
        timeout: float = 300.0,
        token: str | None = None,
        client: Any = None,
        pooled_text: bool = True,
    ) -> None:
        if send not in ("auto", "embeddings", "prompts"):
            raise ValueError(f"send must be 'auto', 'embeddings' or 'prompts', got {send!r}")
        if u is not None and not (isinstance(u, (int, float)) and 0.0 <= u <= 1.0):
            raise ValueError(f"u must lie in [0, 1], got {u!r}")
        if client is None:
            from dinalrm_align.serving.client import RewardClient

            client = RewardClient(url, timeout=timeout, token=token)
        self.client = client
        self.name = name
        self.send = send
        self.u = u
        self.n_noise = n_noise
        self.normalization: ScoreNormalization = resolve_normalization(normalization)
        self.seeding = seeding if seeding is not None else NoiseSeeding()
        self.step = 0
        self.pooled_text = bool(pooled_text)
        embeddings = P.TEXT_EMBEDDINGS if self.pooled_text else (P.PROMPT_EMBEDS,)
        if send == "embeddings":
            self.required_fields: tuple[str, ...] = (P.LATENTS, *embeddings)
            self.optional_fields: tuple[str, ...] = (P.PROMPTS, P.METADATA)
        elif send == "prompts":
            self.required_fields = (P.LATENTS, P.PROMPTS)
            self.optional_fields = (P.METADATA,)
        else:  # auto: embeddings when given, else prompts
            self.required_fields = (P.LATENTS, P.TEXT if self.pooled_text else P.TEXT_UNPOOLED)
            self.optional_fields = (P.PROMPTS, *embeddings, P.METADATA)

    def set_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.step = step

    def score_raw(
        self,
        *,
        latents: torch.Tensor,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Raw server scores (B,) float32 on ``latents``' device."""
        from dinalrm_align.backbones.conditioning import TextConditioning
        from dinalrm_align.rewards.dinalrm import key_embeddings

        b = P.batch_size_of(latents)
        use_embeddings = self.send == "embeddings" or (self.send == "auto" and prompt_embeds is not None)
        if use_embeddings and prompt_embeds is None:
            raise ValueError(
                f"reward {self.name!r} sends embeddings: pass prompt_embeds (and pooled_prompt_embeds for SD3.5 / FLUX)"
            )
        if not use_embeddings and prompts is None:
            raise ValueError(f"reward {self.name!r} sends prompts: pass prompts")
        key = None
        if prompts is None and prompt_embeds is not None:
            cond = prompt_embeds if isinstance(prompt_embeds, TextConditioning) else (
                TextConditioning.from_list(list(prompt_embeds)) if isinstance(prompt_embeds, (list, tuple))
                else TextConditioning(prompt_embeds, pooled_prompt_embeds))
            key = key_embeddings(cond)
        seeds = batch_seeds(
            self.seeding,
            batch_size=b,
            prompts=prompts,
            pooled_prompt_embeds=key,
            metadata=metadata,
            step=self.step,
        )
        if use_embeddings:
            out = self.client.score(
                latents,
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                seeds=seeds,
                u=self.u,
                n_noise=self.n_noise,
            )
        else:
            out = self.client.score(
                latents, prompts=P.check_prompts(prompts, b), seeds=seeds, u=self.u, n_noise=self.n_noise
            )
        return out.raw.to(latents.device)

    def __call__(
        self,
        *,
        latents: torch.Tensor,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Normalised reward (B,) float32 (never differentiable)."""
        raw = self.score_raw(
            latents=latents,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            prompts=prompts,
            metadata=metadata,
        )
        return self.normalization(raw)

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"RemoteLatentReward(name={self.name!r}, url={getattr(self.client, 'url', '?')!r}, send={self.send!r})"
