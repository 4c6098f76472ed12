"""Limits of the reward server (what one request may send, how much work may wait, how it stops).

Every limit is checked before any compute. The defaults follow DiNa-LRM's training data:

* text: ``prompt_embeds`` of at most ``CLIP_MAX_LENGTH + TRAINED_T5_LENGTH`` = 77 + 128 = 205 tokens
  (the SD3.5 CLIP part plus the text length the models were trained with; FLUX.1's T5 tokens and
  Z-Image's chat-templated Qwen3 tokens are at most the text length itself);
* latents: at most ``LARGEST_BUCKET_PX`` = 1472 x 832 pixels = 184 x 104 = 19,136 latent pixels per
  sample (the largest training bucket; the area, so every training aspect ratio fits, either way round).

Memory held by queued and running requests is at most ``max_rows_in_flight`` rows (each row at most
``16 * max_latent_pixels + max_text_tokens * D + P`` float32 values) plus ``max_body_bytes_in_flight``
bytes of request bodies being read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dinalrm_align.reward_model.validation import MAX_INPUT_MAGNITUDE

#: Tokens of SD3.5's CLIP part of ``prompt_embeds`` (the longest fixed prefix of any backbone's text).
CLIP_MAX_LENGTH = 77
#: T5 length DiNa-LRM was trained with; the default text cap is the CLIP part plus this.
TRAINED_T5_LENGTH = 128
DEFAULT_MAX_TEXT_TOKENS = CLIP_MAX_LENGTH + TRAINED_T5_LENGTH
#: Largest training bucket (height, width) in pixels and the VAE's downsampling factor.
LARGEST_BUCKET_PX = (1472, 832)
VAE_FACTOR = 8
DEFAULT_MAX_LATENT_PIXELS = (LARGEST_BUCKET_PX[0] // VAE_FACTOR) * (LARGEST_BUCKET_PX[1] // VAE_FACTOR)
#: Normalised latents and text embeddings are O(1); anything beyond this is not an input (the reward
#: model's own bound, so the server refuses exactly what ``score`` would).
DEFAULT_MAX_ABS_INPUT = MAX_INPUT_MAGNITUDE
#: Environment variable holding the bearer token (server and client).
TOKEN_ENV = "DINALRM_SERVER_TOKEN"


@dataclass(frozen=True)
class ServerSettings:
    """Limits, batching and lifecycle of the server.

    Per request: ``max_request_bytes`` (413), ``max_rows_per_request`` (413), ``max_text_tokens``
    (413, length of ``prompt_embeds``), ``max_latent_pixels`` (413, h * w of one latent),
    ``max_abs_input`` (422, largest |value| of any input tensor), ``max_n_noise`` (422),
    ``read_timeout_s`` (408, to receive the body), ``request_timeout_s`` (504, to get a score).

    Load: ``max_batch_size`` rows per forward pass (merged requests, or chunks of a larger one);
    ``max_queue`` requests waiting for the worker and ``max_rows_in_flight`` rows queued or running
    (503 with ``Retry-After: retry_after_s`` beyond either); ``max_body_bytes_in_flight`` bytes of
    bodies being read (503 beyond; default four maximal bodies).

    Lifecycle: on SIGTERM queued requests are answered 503 at once, the forward pass in progress
    finishes, and open requests are cancelled after ``shutdown_timeout_s``.

    ``token``: if set, every endpoint requires ``Authorization: Bearer <token>`` (401 otherwise).
    """

    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_request_bytes: int = 64 * 2**20
    max_rows_per_request: int = 64
    max_n_noise: int = 8
    max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS
    max_latent_pixels: int = DEFAULT_MAX_LATENT_PIXELS
    max_abs_input: float = DEFAULT_MAX_ABS_INPUT
    max_queue: int = 64
    max_rows_in_flight: int = 256
    max_body_bytes_in_flight: int | None = None
    retry_after_s: int = 1
    read_timeout_s: float = 60.0
    request_timeout_s: float = 300.0
    shutdown_timeout_s: float = 5.0
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        positive = (
            "max_batch_size", "max_request_bytes", "max_rows_per_request", "max_n_noise", "max_text_tokens",
            "max_latent_pixels", "max_queue", "max_rows_in_flight", "retry_after_s",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_abs_input", "read_timeout_s", "request_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.max_wait_ms, (int, float)) and 0 <= self.max_wait_ms < math.inf):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {self.max_wait_ms!r}")
        if self.max_rows_in_flight < self.max_rows_per_request:
            raise ValueError(
                f"max_rows_in_flight ({self.max_rows_in_flight}) must be >= max_rows_per_request "
                f"({self.max_rows_per_request}), or a full-size request could never be admitted"
            )
        if (
            self.max_body_bytes_in_flight is not None
            and self.max_body_bytes_in_flight < self.max_request_bytes
        ):
            raise ValueError(
                f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) must be >= max_request_bytes "
                f"({self.max_request_bytes})"
            )
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise ValueError("token must be a non-empty string (or None for no authentication)")

    @property
    def body_bytes_in_flight(self) -> int:
        """The effective budget for request bodies being read (default: four maximal bodies)."""
        return self.max_body_bytes_in_flight or 4 * self.max_request_bytes

    def wire_limits(self) -> dict[str, Any]:
        """Keyword limits of :func:`~dinalrm_align.serving.wire.build_request`."""
        return {
            "max_rows": self.max_rows_per_request,
            "max_n_noise": self.max_n_noise,
            "max_text_tokens": self.max_text_tokens,
            "max_latent_pixels": self.max_latent_pixels,
            "max_abs_input": self.max_abs_input,
        }

    def public(self) -> dict[str, Any]:
        """The limits as ``/info`` reports them (never the token)."""
        return {
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.max_wait_ms,
            "max_request_bytes": self.max_request_bytes,
            "max_rows_per_request": self.max_rows_per_request,
            "max_n_noise": self.max_n_noise,
            "max_text_tokens": self.max_text_tokens,
            "max_latent_pixels": self.max_latent_pixels,
            "max_abs_input": self.max_abs_input,
            "max_queue": self.max_queue,
            "max_rows_in_flight": self.max_rows_in_flight,
            "max_body_bytes_in_flight": self.body_bytes_in_flight,
            "retry_after_s": self.retry_after_s,
            "request_timeout_s": self.request_timeout_s,
            "shutdown_timeout_s": self.shutdown_timeout_s,
            "auth": self.token is not None,
        }
