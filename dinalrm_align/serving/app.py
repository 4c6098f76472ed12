"""FastAPI application of the reward server: ``POST /score``, ``GET /health``, ``GET /info``.

Request handling never lets a malformed or oversized payload reach the model. In order:
bearer token (401, when the server has one), admission (503 with ``Retry-After`` when shutting
down, when the queue is full or when too many body bytes are being read), body size (413) and
read time (408), decoding (400 unreadable, 415 wrong content type), field checks (413 sizes over
a limit, 422 wrong fields / shapes / dtypes / values / u), rows in flight (503), then the
:class:`~dinalrm_align.serving.batcher.MicroBatcher`. A request whose client disconnects before
its forward pass starts is dropped; one that waits longer than ``request_timeout_s`` gets 504.
A reply never holds NaN or Inf (422 instead). Every error is JSON ``{"error": message}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import ClientDisconnect, HTTPConnection

from dinalrm_align.serving.batcher import MicroBatcher, QueueFullError, ShuttingDownError
from dinalrm_align.serving.engine import ScoringEngine
from dinalrm_align.serving.settings import ServerSettings
from dinalrm_align.serving.wire import PayloadError, ScoreRequest, parse_binary, parse_json

__all__ = ["ServerSettings", "create_app"]

#: How often a waiting request checks whether its client is still connected (seconds).
DISCONNECT_POLL_S = 0.1
#: Status logged for a request whose client went away (nobody receives it).
CLIENT_GONE = 499


class _ClientGone(Exception):
    pass


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates stay printable
    return JSONResponse({"error": safe}, status_code=status, headers=headers)


class _BearerToken(AuthenticationBackend):
    """Every HTTP request must carry ``Authorization: Bearer <token>`` (constant-time comparison)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
        scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
        given = credentials.strip().encode("utf-8")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token):
            raise AuthenticationError(
                "missing or wrong token: send the header 'Authorization: Bearer <token>'"
            )
        return AuthCredentials(["authenticated"]), SimpleUser("client")


def _declared_length(request: Request, limit: int) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        length = int(declared)
    except ValueError as exc:
        raise PayloadError("invalid Content-Length header", 400) from exc
    if length < 0:
        raise PayloadError("invalid Content-Length header", 400)
    if length > limit:
        raise PayloadError(f"request body of {length} bytes exceeds the limit of {limit} bytes", 413)
    return length


async def _read_limited(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(f"request body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _await_result(request: Request, future: Any, timeout_s: float) -> Any:
    """The future's result; cancels it (a no-op once its pass runs) if the client leaves or time runs out."""
    wrapped = asyncio.wrap_future(future)
    wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())  # nothing unretrieved
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        remaining = deadline - loop.time()
        done, _ = await asyncio.wait({wrapped}, timeout=max(0.0, min(DISCONNECT_POLL_S, remaining)))
        if done:
            return wrapped.result()
        if await request.is_disconnected():
            future.cancel()
            raise _ClientGone
        if loop.time() >= deadline:
            future.cancel()
            raise asyncio.TimeoutError


def _non_finite(name: str, values: torch.Tensor) -> str | None:
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if not bad:
        return None
    return (
        f"the model produced a non-finite {name} for sample(s) {bad[:8]}; the inputs are outside what it "
        "can score (check that the latents are normalised for its backbone and the embeddings come from its "
        "text stack)"
    )


def create_app(engine: ScoringEngine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app; the micro-batcher runs for the app's lifetime (lifespan)."""
    settings = settings or ServerSettings()
    batcher: MicroBatcher[ScoreRequest, Any] = MicroBatcher(
        lambda requests: engine.score_batch(requests, max_rows=settings.max_batch_size),
        key=engine.group_key,
        rows=lambda r: r.batch_size,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue,
        max_rows_in_flight=settings.max_rows_in_flight,
    )
    limits = settings.wire_limits()
    retry = {"Retry-After": str(math.ceil(settings.retry_after_s))}
    body_budget = {"free": settings.body_bytes_in_flight}  # touched only on the event loop
    http_stats = {"client_gone_before_queue": 0}  # the same

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop(timeout=settings.shutdown_timeout_s)

    app = FastAPI(title="dinalrm-align reward server", lifespan=lifespan)
    app.state.engine = engine
    app.state.batcher = batcher
    app.state.settings = settings
    if settings.token is not None:
        app.add_middleware(
            AuthenticationMiddleware,
            backend=_BearerToken(settings.token),
            on_error=lambda _conn, exc: _error(401, str(exc), {"WWW-Authenticate": "Bearer"}),
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}")

    def parse(body: bytes, content_type: str, query: dict[str, str]) -> ScoreRequest:
        if content_type == "application/json":
            if query:
                raise PayloadError("JSON requests carry their options in the body, not the query string")
            req = parse_json(body, **limits)
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
    async def health() -> Any:
        if batcher.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok" if batcher.running else "stopped"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {
            **engine.info(),
            **settings.public(),
            "load": batcher.load(),
            "stats": {**batcher.stats.as_dict(), **http_stats},
        }

    async def receive(request: Request) -> ScoreRequest | Response:
        """Admission, body and parsing: the parsed request, or the error response."""
        if batcher.closing:
            return _error(503, "the reward server is shutting down", retry)
        if batcher.queue_full():
            batcher.count_rejected()
            return _error(
                503, f"the queue is full ({settings.max_queue} requests waiting); retry later", retry
            )
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            declared = _declared_length(request, settings.max_request_bytes)
        except PayloadError as exc:
            return _error(exc.status, str(exc))
        need = settings.max_request_bytes if declared is None else declared
        if need > body_budget["free"]:
            batcher.count_rejected()
            return _error(503, "too many request bodies are being received; retry later", retry)
        body_budget["free"] -= need
        try:
            body = await asyncio.wait_for(
                _read_limited(request, settings.max_request_bytes), settings.read_timeout_s
            )
            return await run_in_threadpool(parse, body, content_type, dict(request.query_params))
        except PayloadError as exc:
            return _error(exc.status, str(exc))
        except asyncio.TimeoutError:
            return _error(408, f"the request body did not arrive within {settings.read_timeout_s} s")
        except ClientDisconnect:
            http_stats["client_gone_before_queue"] += 1
            return Response(status_code=CLIENT_GONE)
        finally:
            body_budget["free"] += need

    @app.post("/score")
    async def score(request: Request) -> Any:
        req = await receive(request)
        if isinstance(req, Response):
            return req
        if await request.is_disconnected():
            http_stats["client_gone_before_queue"] += 1
            return Response(status_code=CLIENT_GONE)
        try:
            future = batcher.submit(req)
        except (QueueFullError, ShuttingDownError) as exc:
            return _error(503, str(exc), retry)
        try:
            raw = await _await_result(request, future, settings.request_timeout_s)
        except _ClientGone:
            return Response(status_code=CLIENT_GONE)
        except asyncio.TimeoutError:
            return _error(504, f"scoring took longer than {settings.request_timeout_s} s")
        except ShuttingDownError as exc:
            return _error(503, str(exc), retry)
        except ValueError as exc:  # a model-side check that the request checks did not catch
            return _error(422, str(exc))
        except Exception as exc:  # never crash the server on one request
            return _error(500, f"scoring failed: {type(exc).__name__}: {exc}")
        u = engine.u_of(req)
        normalization = engine.reward.normalization
        score_values = normalization(raw)
        problem = _non_finite("raw score", raw) or _non_finite("normalised score", score_values)
        if problem:
            return _error(422, problem)
        return {
            "raw": raw.tolist(),
            "score": score_values.tolist(),
            "seeds": req.seeds,
            "u": u,
            "sigma": engine.sigma_of(u),
            "n_noise": engine.n_noise_of(req),
            "normalization": normalization.as_dict(),
            "batch_size": req.batch_size,
        }

    return app
