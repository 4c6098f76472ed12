"""Python client of the reward server (httpx).

::

    with RewardClient("http://127.0.0.1:8000") as client:
        out = client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seed=0)   # binary
        out = client.score(latents, prompts=["a cat", "a dog"], u=0.4, seeds=[1, 2])          # JSON
        out.raw, out.score   # (B,) float32 tensors; out.seeds replays the exact noise
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dinalrm_align.serving.wire import encode_tensors, json_body


class RemoteRewardError(RuntimeError):
    """The server answered with an error (``status`` 4xx / 5xx, ``message`` its explanation)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"reward server answered {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class RemoteScores:
    """One response: ``raw`` and ``score`` (B,) float32 CPU tensors, the seeds and settings used."""

    raw: torch.Tensor
    score: torch.Tensor
    seeds: list[int]
    u: float
    sigma: float
    n_noise: int
    normalization: dict[str, Any]


class RewardClient:
    """Talks to ``dinalrm-align serve``.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds per request.
        transport: optional httpx transport (tests).
    """

    def __init__(
        self, url: str = "http://127.0.0.1:8000", *, timeout: float = 300.0, transport: Any = None
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check(self, response: Any) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise RemoteRewardError(response.status_code, str(message))
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._check(self._http.get("/health"))

    def info(self) -> dict[str, Any]:
        return self._check(self._http.get("/info"))

    def score(
        self,
        latents: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        u: float | None = None,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        n_noise: int | None = None,
    ) -> RemoteScores:
        """Score latents (B, 16, h, w) with embeddings (binary request) or prompts (JSON request).

        ``seeds`` (B ints) fix each sample's noise, ``seed`` the whole request's; ``u``/``n_noise``
        default to the server's. Raises :class:`RemoteRewardError` on a 4xx/5xx answer.
        """
        if prompts is not None and prompt_embeds is not None:
            raise ValueError("pass prompts or prompt embeddings, not both")
        if prompts is not None:
            body = json_body(latents, list(prompts), u=u, seed=seed, seeds=seeds, n_noise=n_noise)
            response = self._http.post("/score", json=body)
        else:
            if prompt_embeds is None or pooled_prompt_embeds is None:
                raise ValueError("pass prompts, or both prompt_embeds and pooled_prompt_embeds")
            tensors = {
                "latents": latents,
                "prompt_embeds": prompt_embeds,
                "pooled_prompt_embeds": pooled_prompt_embeds,
            }
            if seeds is not None:
                tensors["seeds"] = torch.tensor(list(seeds), dtype=torch.int64)
            params = {k: v for k, v in (("u", u), ("seed", seed), ("n_noise", n_noise)) if v is not None}
            response = self._http.post(
                "/score",
                content=encode_tensors(tensors),
                params=params,
                headers={"content-type": "application/octet-stream"},
            )
        data = self._check(response)
        return RemoteScores(
            raw=torch.tensor(data["raw"], dtype=torch.float32),
            score=torch.tensor(data["score"], dtype=torch.float32),
            seeds=list(data["seeds"]),
            u=float(data["u"]),
            sigma=float(data["sigma"]),
            n_noise=int(data["n_noise"]),
            normalization=dict(data["normalization"]),
        )
