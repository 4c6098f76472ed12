"""Python client of the reward server (httpx).

::

    with RewardClient("http://127.0.0.1:8000") as client:
        out = client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seed=0)   # binary
        out = client.score(latents, prompts=["a cat", "a dog"], u=0.4, seeds=[1, 2])          # JSON
        out.raw, out.score   # (B,) float32 tensors; out.seeds replays the exact noise

A server started with a token needs ``RewardClient(url, token=...)`` (default: the environment
variable ``DINALRM_SERVER_TOKEN``). An overloaded server answers 503 with ``Retry-After``; the
client waits that long and retries (``retries`` times) before raising.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dinalrm_align.serving.settings import TOKEN_ENV
from dinalrm_align.serving.wire import encode_tensors, json_body

#: Longest wait between two retries of a 503, whatever ``Retry-After`` says (seconds).
MAX_RETRY_WAIT_S = 30.0


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
        token: bearer token of a server that requires one (default: ``$DINALRM_SERVER_TOKEN``;
            ``""`` sends none).
        retries: how often a 503 (server busy or restarting) is retried after its ``Retry-After``.
        transport: optional httpx transport (tests).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 300.0,
        token: str | None = None,
        retries: int = 2,
        transport: Any = None,
    ) -> None:
        import httpx

        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if token is None:
            token = os.environ.get(TOKEN_ENV, "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.retries = retries
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, request: Callable[[], Any]) -> Any:
        """``request()``, retried on 503 after the server's ``Retry-After`` (scoring is idempotent)."""
        attempt = 0
        while True:
            response = request()
            if response.status_code != 503 or attempt >= self.retries:
                return response
            attempt += 1
            try:
                wait = float(response.headers.get("retry-after", "1"))
            except ValueError:  # an HTTP date or garbage: a second
                wait = 1.0
            time.sleep(min(max(wait, 0.0), MAX_RETRY_WAIT_S) if math.isfinite(wait) else 1.0)

    def _check(self, response: Any) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise RemoteRewardError(response.status_code, str(message))
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._check(self._http.get("/health"))  # a probe: no retries

    def info(self) -> dict[str, Any]:
        return self._check(self._send(lambda: self._http.get("/info")))

    def score(
        self,
        latents: torch.Tensor,
        *,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        u: float | None = None,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        n_noise: int | None = None,
    ) -> RemoteScores:
        """Score latents (B, 16, h, w) with embeddings (binary request) or prompts (JSON request).

        ``prompt_embeds``: what the server's family's ``encode_prompts`` returns: a (B, L, D) tensor (with
        ``pooled_prompt_embeds`` for SD3.5 / FLUX.1), a list of variable-length (L_i, D) tensors (Z-Image;
        sent padded with a mask), or a :class:`~dinalrm_align.backbones.conditioning.TextConditioning`.

        ``seeds`` (B ints) fix each sample's noise, ``seed`` the whole request's; ``u``/``n_noise``
        default to the server's. Raises :class:`RemoteRewardError` on a 4xx/5xx answer (a 503 only
        after ``retries`` retries).
        """
        if prompts is not None and prompt_embeds is not None:
            raise ValueError("pass prompts or prompt embeddings, not both")
        if prompts is not None:
            body = json_body(latents, list(prompts), u=u, seed=seed, seeds=seeds, n_noise=n_noise)
            response = self._send(lambda: self._http.post("/score", json=body))
        else:
            if prompt_embeds is None:
                raise ValueError("pass prompts, or prompt_embeds (and pooled_prompt_embeds where the model needs it)")
            from dinalrm_align.backbones.conditioning import TextConditioning

            if isinstance(prompt_embeds, TextConditioning):
                cond = prompt_embeds
            elif isinstance(prompt_embeds, (list, tuple)):
                cond = TextConditioning.from_list(list(prompt_embeds))
            else:
                cond = TextConditioning(prompt_embeds)
            pooled = pooled_prompt_embeds if pooled_prompt_embeds is not None else cond.pooled
            tensors = {"latents": latents, "prompt_embeds": cond.embeds.contiguous()}
            if pooled is not None:
                tensors["pooled_prompt_embeds"] = pooled
            if cond.mask is not None:
                tensors["prompt_embeds_mask"] = cond.mask.contiguous()
            if seeds is not None:
                tensors["seeds"] = torch.tensor(list(seeds), dtype=torch.int64)
            params = {k: v for k, v in (("u", u), ("seed", seed), ("n_noise", n_noise)) if v is not None}
            content = encode_tensors(tensors)
            response = self._send(
                lambda: self._http.post(
                    "/score",
                    content=content,
                    params=params,
                    headers={"content-type": "application/octet-stream"},
                )
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
