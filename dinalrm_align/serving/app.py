"""FastAPI application of the reward server: ``POST /score``, ``GET /health``, ``GET /info``.

Request handling never lets a malformed payload reach the model: the body is size-limited
(413), decoded and checked (400 unreadable, 415 wrong content type, 422 wrong fields / shapes /
dtypes / u), then queued on the :class:`~dinalrm_align.serving.batcher.MicroBatcher`. Errors are
JSON ``{"error": message}``. See :mod:`dinalrm_align.serving.wire` for the payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from dinalrm_align.serving.batcher import MicroBatcher
from dinalrm_align.serving.engine import ScoringEngine
from dinalrm_align.serving.wire import PayloadError, ScoreRequest, parse_binary, parse_json


@dataclass(frozen=True)
class ServerSettings:
    """Limits and batching of the server.

    ``max_batch_size``: most rows per forward pass (merged requests, or chunks of a larger one);
    ``max_rows_per_request``: largest batch a single request may send (413 beyond).
    """

    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_request_bytes: int = 64 * 2**20
    max_rows_per_request: int = 64
    max_n_noise: int = 8
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_request_bytes", "max_rows_per_request", "max_n_noise"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError as exc:
            raise PayloadError("invalid Content-Length header", 400) from exc
        if length > limit:
            raise PayloadError(f"request body of {length} bytes exceeds the limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(f"request body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine: ScoringEngine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app; the micro-batcher runs for the app's lifetime (lifespan)."""
    settings = settings or ServerSettings()
    batcher: MicroBatcher[ScoreRequest, Any] = MicroBatcher(
        lambda requests: engine.score_batch(requests, max_rows=settings.max_batch_size),
        key=engine.group_key,
        rows=lambda r: r.batch_size,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
    )
    limits = {"max_rows": settings.max_rows_per_request, "max_n_noise": settings.max_n_noise}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="dinalrm-align reward server", lifespan=lifespan)
    app.state.engine = engine
    app.state.batcher = batcher
    app.state.settings = settings

    def parse(body: bytes, content_type: str, query: dict[str, str]) -> ScoreRequest:
        if content_type == "application/json":
            req = parse_json(body, **limits)
            if query:
                raise PayloadError("JSON requests carry their options in the body, not the query string")
        elif content_type in ("application/octet-stream", "application/safetensors"):
            req = parse_binary(body, query, **limits)
        else:
            raise PayloadError(
                f"unsupported Content-Type {content_type or '(none)'!r}; use application/octet-stream "
                "(safetensors body) or application/json",
                415,
            )
        engine.validate(req)
        return req

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if batcher.running else "stopped"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {
            **engine.info(),
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_request_bytes": settings.max_request_bytes,
            "max_rows_per_request": settings.max_rows_per_request,
            "max_n_noise": settings.max_n_noise,
            "stats": batcher.stats.as_dict(),
        }

    @app.post("/score")
    async def score(request: Request):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            body = await _read_limited(request, settings.max_request_bytes)
            req = await run_in_threadpool(parse, body, content_type, dict(request.query_params))
        except PayloadError as exc:
            return _error(exc.status, str(exc))
        try:
            future = batcher.submit(req)
            raw = await asyncio.wait_for(asyncio.wrap_future(future), settings.request_timeout_s)
        except asyncio.TimeoutError:
            return _error(504, f"scoring took longer than {settings.request_timeout_s} s")
        except ValueError as exc:  # a model-side check that the request checks did not catch
            return _error(422, str(exc))
        except Exception as exc:  # never crash the server on one request
            return _error(500, f"scoring failed: {type(exc).__name__}: {exc}")
        u = engine.u_of(req)
        normalization = engine.reward.normalization
        return {
            "raw": raw.tolist(),
            "score": normalization(raw).tolist(),
            "seeds": req.seeds,
            "u": u,
            "sigma": engine.sigma_of(u),
            "n_noise": engine.n_noise_of(req),
            "normalization": normalization.as_dict(),
            "batch_size": req.batch_size,
        }

    return app
