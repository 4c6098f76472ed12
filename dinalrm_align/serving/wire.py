"""Wire format of the reward server (pure functions; no web framework here).

``POST /score`` accepts two encodings:

1. **binary** -- ``Content-Type: application/octet-stream``: the body is a safetensors file with
   ``latents`` (B, 16, h, w) (unpacked) and ``prompt_embeds`` (B, L, D) (float16 / bfloat16 / float32),
   plus, as the model's family needs: ``pooled_prompt_embeds`` (B, P) (SD3.5, FLUX.1) and
   ``prompt_embeds_mask`` (B, L) (bool / integer 0-1; variable-length text such as Z-Image's, padded
   to the longest caption); optionally ``seeds`` (B,) int64. Options go in the query string:
   ``?u=0.4&seed=0&n_noise=1``. Which of the optional fields the model needs is the engine's check.
2. **JSON** -- ``Content-Type: application/json``::

       {"tensors": "<base64 of a safetensors file with latents (and optionally the embeddings)>",
        "prompts": ["a cat", ...],      # B strings, encoded by the server's own text stack
        "u": 0.4, "seed": 0, "seeds": [..B ints..], "n_noise": 1}   # all optional

Either ``prompts`` or the embeddings must be given. Seeds: ``seeds`` (one per sample) win over
``seed`` (one per request, expanded per sample by ``seeding.request_seeds``); with neither, the
server draws random seeds and returns them, so every score can be replayed.

The response is JSON: ``{"raw": [B floats], "score": [B floats], "seeds": [B ints], "u", "sigma",
"n_noise", "normalization": {"name", "offset", "scale"}, "batch_size"}``; errors are 4xx with
``{"error": message}``.

Size limits (413: rows per request, text tokens, latent pixels) are checked on the shapes before
any value is read; then values (422: NaN / Inf, |value| above ``max_abs_input``).
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
from dinalrm_align.serving.settings import (
    DEFAULT_MAX_ABS_INPUT,
    DEFAULT_MAX_LATENT_PIXELS,
    DEFAULT_MAX_TEXT_TOKENS,
)

TENSOR_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "prompt_embeds_mask", "seeds")
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
    prompt_embeds_mask: torch.Tensor | None = None

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
    """dtype, rank and non-empty dimensions (no values are read here)."""
    x = tensors.get(key)
    if x is None:
        return None
    if x.dtype not in FLOAT_DTYPES:
        raise PayloadError(f"{key} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != dims:
        raise PayloadError(f"{key} must be {dims}-D, got shape {tuple(x.shape)}")
    if 0 in x.shape:
        raise PayloadError(f"{key} has a dimension of size 0 (shape {tuple(x.shape)})")
    return x


def _mask_tensor(tensors: Mapping[str, torch.Tensor], pe: torch.Tensor | None) -> torch.Tensor | None:
    """``prompt_embeds_mask`` (B, L) matching ``prompt_embeds``, as bool; every row needs a real token."""
    mask = tensors.get("prompt_embeds_mask")
    if mask is None:
        return None
    if pe is None:
        raise PayloadError("prompt_embeds_mask needs prompt_embeds")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise PayloadError(f"prompt_embeds_mask must be bool or integer 0/1, got {mask.dtype}")
    if tuple(mask.shape) != tuple(pe.shape[:2]):
        raise PayloadError(f"prompt_embeds_mask must have shape {tuple(pe.shape[:2])} (B, L), got {tuple(mask.shape)}")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise PayloadError("prompt_embeds_mask must hold only 0 and 1")
    mask = mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise PayloadError("every row of prompt_embeds_mask needs at least one real token")
    return mask


def _checked_values(x: torch.Tensor, key: str, max_abs: float) -> torch.Tensor:
    """``x`` as float32 after checking it is finite and bounded by ``max_abs``.

    One reduction, no temporary copy: min and max propagate NaN, and an Inf is the min or the max.
    """
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise PayloadError(f"{key} contains NaN or Inf values")
    largest = max(-lo, hi)
    if largest > max_abs:
        raise PayloadError(
            f"{key} has values up to {largest:.3g} in magnitude; this server accepts |value| <= {max_abs:g} "
            "(normalised latents and text embeddings are O(1))"
        )
    return x.float()


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PayloadError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{key} must be an integer, got {value!r}")
    return value


def _shown(value: int) -> str:
    """An integer for an error message (huge ones by their size)."""
    return str(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"


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
            raise PayloadError(f"seeds[{i}] must lie in [0, 2**63 - 1], got {_shown(v)}")
        out.append(v)
    return out


def _check_prompts(prompts: Any, batch_size: int, max_prompt_chars: int) -> list[str]:
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PayloadError("prompts must be a list of strings")
    if len(prompts) != batch_size:
        raise PayloadError(f"got {batch_size} latents but {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if len(p) > max_prompt_chars:
            raise PayloadError(f"prompt {i} is longer than {max_prompt_chars} characters")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PayloadError(f"prompt {i} is not valid Unicode text ({exc.reason} at {exc.start})") from exc
    return list(prompts)


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
    max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS,
    max_latent_pixels: int = DEFAULT_MAX_LATENT_PIXELS,
    max_abs_input: float = DEFAULT_MAX_ABS_INPUT,
    max_prompt_chars: int = 2000,
) -> ScoreRequest:
    """Check field presence, dtypes, ranks, sizes, values and cross-field consistency.

    Sizes over a limit are 413, anything else malformed 422. Model-specific checks (channels,
    widths, grid size, whether the pooled embedding is needed) happen in the engine.
    """
    latents = _float_tensor(tensors, "latents", 4)
    if latents is None:
        raise PayloadError("missing tensor 'latents' (B, 16, h, w)")
    b, _, h, w = (int(d) for d in latents.shape)
    if b > max_rows:
        raise PayloadError(f"batch of {b} exceeds this server's limit of {max_rows} samples per request", 413)
    if h * w > max_latent_pixels:
        raise PayloadError(
            f"latents of {h}x{w} = {h * w} latent pixels exceed this server's limit of {max_latent_pixels} "
            "per sample",
            413,
        )
    pe = _float_tensor(tensors, "prompt_embeds", 3)
    pooled = _float_tensor(tensors, "pooled_prompt_embeds", 2)
    if pe is not None and pe.shape[1] > max_text_tokens:
        raise PayloadError(
            f"prompt_embeds has {pe.shape[1]} tokens; this server accepts at most {max_text_tokens}", 413
        )
    if pooled is not None and pe is None:
        raise PayloadError("pooled_prompt_embeds needs prompt_embeds; send both, or prompts instead")
    if pe is not None and prompts is not None:
        raise PayloadError("send either prompts or prompt embeddings, not both")
    if pe is None and prompts is None:
        raise PayloadError(
            "missing text conditions: send prompts (JSON) or prompt_embeds + pooled_prompt_embeds"
        )
    mask = _mask_tensor(tensors, pe)
    if pe is not None and (pe.shape[0] != b or (pooled is not None and pooled.shape[0] != b)):
        raise PayloadError(
            f"batch sizes disagree: latents {b}, prompt_embeds {pe.shape[0]}, pooled_prompt_embeds "
            f"{pooled.shape[0] if pooled is not None else '-'}"
        )
    prompt_list = _check_prompts(prompts, b, max_prompt_chars) if prompts is not None else None
    u_value = None
    if u is not None:
        u_value = _number(u, "u")
        if not 0.0 <= u_value <= 1.0:
            raise PayloadError(f"u must lie in [0, 1] (the noise level sigma), got {u_value}")
    n_value = None
    if n_noise is not None:
        n_value = _integer(n_noise, "n_noise")
        if not 1 <= n_value <= max_n_noise:
            raise PayloadError(f"n_noise must lie in [1, {max_n_noise}], got {_shown(n_value)}")
    if seeds is None and "seeds" in tensors:
        seeds = tensors["seeds"]
    if seeds is not None:
        seed_list = _seed_list(seeds, b)
    elif seed is not None:
        seed_value = _integer(seed, "seed")
        if not 0 <= seed_value <= MAX_SEED:
            raise PayloadError(f"seed must lie in [0, 2**63 - 1], got {_shown(seed_value)}")
        seed_list = request_seeds(seed_value, b)
    else:
        seed_list = [secrets.randbits(62) for _ in range(b)]
    latents = _checked_values(latents, "latents", max_abs_input)
    if pe is not None:
        pe = _checked_values(pe, "prompt_embeds", max_abs_input)
    if pooled is not None:
        pooled = _checked_values(pooled, "pooled_prompt_embeds", max_abs_input)
    return ScoreRequest(latents, pe, pooled, prompt_list, seed_list, u_value, n_value, mask)


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
    except RecursionError as exc:
        raise PayloadError("body is not acceptable JSON: nested too deeply", 400) from exc
    except ValueError as exc:  # also UnicodeDecodeError and integers too long to convert
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
