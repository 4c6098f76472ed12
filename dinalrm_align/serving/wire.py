"""Wire format of the reward server (pure functions; no web framework here).

``POST /score`` accepts two encodings:

1. **binary** -- ``Content-Type: application/octet-stream``: the body is a safetensors file with
   ``latents`` (B, 16, h, w) and ``prompt_embeds`` (B, 77+L, D) + ``pooled_prompt_embeds`` (B, P)
   (float16 / bfloat16 / float32), optionally ``seeds`` (B,) int64. Options go in the query
   string: ``?u=0.4&seed=0&n_noise=1``.
2. **JSON** -- ``Content-Type: application/json``::

       {"tensors": "<base64 of a safetensors file with latents (and optionally the embeddings)>",
        "prompts": ["a cat", ...],      # B strings, encoded by the server's SD3 text stack
        "u": 0.4, "seed": 0, "seeds": [..B ints..], "n_noise": 1}   # all optional

Either ``prompts`` or both embeddings must be given. Seeds: ``seeds`` (one per sample) win over
``seed`` (one per request, expanded per sample by ``seeding.request_seeds``); with neither, the
server draws random seeds and returns them, so every score can be replayed.

The response is JSON: ``{"raw": [B floats], "score": [B floats], "seeds": [B ints], "u", "sigma",
"n_noise", "normalization": {"name", "offset", "scale"}, "batch_size"}``; errors are 4xx with
``{"error": message}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dinalrm_align.rewards.seeding import MAX_SEED, request_seeds

TENSOR_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "seeds")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
JSON_KEYS = ("tensors", "prompts", "u", "seed", "seeds", "n_noise")
QUERY_KEYS = ("u", "seed", "n_noise")


class PayloadError(ValueError):
    """A malformed request; ``status`` is the HTTP status to answer with (400, 413, 415, 422)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ScoreRequest:
    """A parsed, shape-checked request (tensors on CPU, float32)."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor | None
    prompts: list[str] | None
    seeds: list[int]
    u: float | None
    n_noise: int | None

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])


# ---------------------------------------------------------------------- encoding (client side)
def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of ``tensors`` (copied to contiguous CPU tensors; views of one buffer are fine)."""
    from safetensors.torch import save

    return save(
        {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    )


def json_body(
    latents: torch.Tensor,
    prompts: Sequence[str],
    *,
    u: float | None = None,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    n_noise: int | None = None,
) -> dict[str, Any]:
    """The JSON encoding of a prompts request."""
    body: dict[str, Any] = {
        "tensors": base64.b64encode(encode_tensors({"latents": latents})).decode("ascii"),
        "prompts": list(prompts),
    }
    for key, value in (
        ("u", u),
        ("seed", seed),
        ("seeds", list(seeds) if seeds is not None else None),
        ("n_noise", n_noise),
    ):
        if value is not None:
            body[key] = value
    return body


# ---------------------------------------------------------------------- decoding (server side)
def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything unreadable is a 400."""
    from safetensors.torch import load

    if len(data) < 8:
        raise PayloadError("body is not a safetensors file (too short)", 400)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt bytes
        raise PayloadError(f"body is not a valid safetensors file: {exc}", 400) from exc
    unknown = sorted(set(tensors) - set(TENSOR_KEYS))
    if unknown:
        raise PayloadError(f"unknown tensors {unknown}; allowed: {list(TENSOR_KEYS)}")
    return tensors


def _float_tensor(tensors: Mapping[str, torch.Tensor], key: str, dims: int) -> torch.Tensor | None:
    x = tensors.get(key)
    if x is None:
        return None
    if x.dtype not in FLOAT_DTYPES:
        raise PayloadError(f"{key} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != dims:
        raise PayloadError(f"{key} must be {dims}-D, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise PayloadError(f"{key} contains NaN or Inf values")
    return x.float()


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PayloadError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{key} must be an integer, got {value!r}")
    return value


def _seed_list(values: Any, batch_size: int) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dtype not in (torch.int64, torch.int32) or values.dim() != 1:
            raise PayloadError(f"seeds must be a 1-D int64 tensor, got {values.dtype} {tuple(values.shape)}")
        values = values.tolist()
    if not isinstance(values, list):
        raise PayloadError(f"seeds must be a list of integers, got {type(values).__name__}")
    if len(values) != batch_size:
        raise PayloadError(f"got {batch_size} latents but {len(values)} seeds")
    out = []
    for i, v in enumerate(values):
        v = _integer(v, f"seeds[{i}]")
        if not 0 <= v <= MAX_SEED:
            raise PayloadError(f"seeds[{i}] must lie in [0, 2**63 - 1], got {v}")
        out.append(v)
    return out


def build_request(
    tensors: Mapping[str, torch.Tensor],
    *,
    prompts: Any = None,
    u: Any = None,
    seed: Any = None,
    seeds: Any = None,
    n_noise: Any = None,
    max_rows: int,
    max_n_noise: int,
    max_prompt_chars: int = 2000,
) -> ScoreRequest:
    """Check field presence, dtypes, ranks and cross-field consistency; 422 on any problem.

    Model-specific checks (channels, widths, grid size) happen in the engine.
    """
    latents = _float_tensor(tensors, "latents", 4)
    if latents is None:
        raise PayloadError("missing tensor 'latents' (B, 16, h, w)")
    b = int(latents.shape[0])
    if b < 1:
        raise PayloadError("latents has an empty batch")
    if b > max_rows:
        raise PayloadError(f"batch of {b} exceeds this server's limit of {max_rows} samples per request", 413)
    pe = _float_tensor(tensors, "prompt_embeds", 3)
    pooled = _float_tensor(tensors, "pooled_prompt_embeds", 2)
    if (pe is None) != (pooled is None):
        raise PayloadError("send both prompt_embeds and pooled_prompt_embeds, or prompts instead")
    if pe is not None and prompts is not None:
        raise PayloadError("send either prompts or prompt embeddings, not both")
    if pe is None and prompts is None:
        raise PayloadError(
            "missing text conditions: send prompts (JSON) or prompt_embeds + pooled_prompt_embeds"
        )
    if pe is not None and (pe.shape[0] != b or pooled.shape[0] != b):  # type: ignore[union-attr]
        raise PayloadError(
            f"batch sizes disagree: latents {b}, prompt_embeds {pe.shape[0]}, pooled_prompt_embeds {pooled.shape[0]}"  # type: ignore[union-attr]
        )
    if prompts is not None:
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise PayloadError("prompts must be a list of strings")
        if len(prompts) != b:
            raise PayloadError(f"got {b} latents but {len(prompts)} prompts")
        long = [i for i, p in enumerate(prompts) if len(p) > max_prompt_chars]
        if long:
            raise PayloadError(f"prompt {long[0]} is longer than {max_prompt_chars} characters")
    u_value = None
    if u is not None:
        u_value = _number(u, "u")
        if not 0.0 <= u_value <= 1.0:
            raise PayloadError(f"u must lie in [0, 1] (the noise level sigma), got {u_value}")
    n_value = None
    if n_noise is not None:
        n_value = _integer(n_noise, "n_noise")
        if not 1 <= n_value <= max_n_noise:
            raise PayloadError(f"n_noise must lie in [1, {max_n_noise}], got {n_value}")
    if seeds is None and "seeds" in tensors:
        seeds = tensors["seeds"]
    if seeds is not None:
        seed_list = _seed_list(seeds, b)
    elif seed is not None:
        seed_value = _integer(seed, "seed")
        if not 0 <= seed_value <= MAX_SEED:
            raise PayloadError(f"seed must lie in [0, 2**63 - 1], got {seed_value}")
        seed_list = request_seeds(seed_value, b)
    else:
        seed_list = [secrets.randbits(62) for _ in range(b)]
    return ScoreRequest(
        latents, pe, pooled, list(prompts) if prompts is not None else None, seed_list, u_value, n_value
    )


def _query_value(key: str, raw: str) -> Any:
    try:
        return float(raw) if key == "u" else int(raw)
    except ValueError as exc:
        raise PayloadError(f"query parameter {key}={raw!r} is not a number") from exc


def parse_binary(body: bytes, query: Mapping[str, str], **limits: Any) -> ScoreRequest:
    """A safetensors body with options in the query string."""
    unknown = sorted(set(query) - set(QUERY_KEYS))
    if unknown:
        raise PayloadError(f"unknown query parameters {unknown}; allowed: {list(QUERY_KEYS)}")
    options = {k: _query_value(k, v) for k, v in query.items()}
    return build_request(decode_tensors(body), **options, **limits)


def parse_json(body: bytes, **limits: Any) -> ScoreRequest:
    """A JSON body with base64 safetensors under ``tensors``."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"body is not valid JSON: {exc}", 400) from exc
    if not isinstance(payload, dict):
        raise PayloadError("JSON body must be an object", 400)
    unknown = sorted(set(payload) - set(JSON_KEYS))
    if unknown:
        raise PayloadError(f"unknown JSON fields {unknown}; allowed: {list(JSON_KEYS)}")
    if "tensors" not in payload:
        raise PayloadError("missing field 'tensors' (base64 safetensors with 'latents')")
    if not isinstance(payload["tensors"], str):
        raise PayloadError("field 'tensors' must be a base64 string")
    try:
        data = base64.b64decode(payload["tensors"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"field 'tensors' is not valid base64: {exc}", 400) from exc
    options = {k: payload.get(k) for k in ("prompts", "u", "seed", "seeds", "n_noise")}
    return build_request(decode_tensors(data), **options, **limits)
