"""`dinalrm-align serve`: serve a latent reward model over HTTP (FastAPI + uvicorn).

    dinalrm-align serve --model liuhuohuo/DiNa-LRM-SD35M-12layers \
        --pipeline stabilityai/stable-diffusion-3.5-medium --host 127.0.0.1 --port 8000
    dinalrm-align serve --tiny --port 8000          # the built-in tiny models (demos, tests)
    dinalrm-align serve --model tiny-flux           # tiny FLUX.1-style models (also tiny-zimage; --pipeline
                                                    # defaults to the same tiny id)

Set ``DINALRM_SERVER_TOKEN`` (or pass ``--token``) to require ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dinalrm_align.serving.settings import (
    CLIP_MAX_LENGTH,
    DEFAULT_MAX_ABS_INPUT,
    DEFAULT_MAX_LATENT_PIXELS,
    DEFAULT_MAX_TEXT_TOKENS,
    TOKEN_ENV,
    ServerSettings,
)

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
TINY_SEQ_LEN = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dinalrm-align serve",
        description="Serve a DiNa-LRM latent reward model: POST /score, GET /health, GET /info.",
    )
    src = p.add_argument_group("model")
    src.add_argument("--model", help="reward model: hub id, local folder or tiny id (tiny, tiny-flux, tiny-zimage)")
    src.add_argument(
        "--pipeline",
        default=None,
        help="pipeline of the reward model's family (text encoders; its transformer is freed): hub id, folder or "
        "tiny id (default: the reward model's own base pipeline)",
    )
    src.add_argument("--tiny", action="store_true", help="serve the built-in tiny SD3.5-style models (= --model tiny)")
    src.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    src.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: cuda if available)")
    score = p.add_argument_group("scoring")
    score.add_argument("--u", type=float, default=0.4, help="default noise level sigma of a request")
    score.add_argument("--n-noise", type=int, default=1, help="default noise draws averaged per sample")
    score.add_argument(
        "--normalization",
        default="display",
        help="'display' (raw+10)/10, 'fork' (raw+12)/10, 'raw', 'model' or OFFSET,SCALE",
    )
    score.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help=f"text length for prompt requests (default 128; {TINY_SEQ_LEN} for the tiny models)",
    )
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' on every endpoint (default: ${TOKEN_ENV}; the "
        "environment variable keeps it out of the process list)",
    )
    net.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    net.add_argument("--verbose", "-v", action="store_true", help="tracebacks on start-up errors")
    lim = p.add_argument_group("limits (a request over a size limit gets 413, over a value limit 422)")
    lim.add_argument("--max-request-mb", type=float, default=64.0, help="request body size limit")
    lim.add_argument(
        "--max-rows-per-request", type=int, default=64, help="largest batch one request may send"
    )
    lim.add_argument(
        "--max-text-tokens",
        type=int,
        default=None,
        help=f"longest prompt_embeds (default {DEFAULT_MAX_TEXT_TOKENS} = 77 CLIP + 128 T5, or 77 + "
        "--max-sequence-length if that is longer)",
    )
    lim.add_argument(
        "--max-latent-pixels",
        type=int,
        default=DEFAULT_MAX_LATENT_PIXELS,
        help=f"largest h*w of one latent (default {DEFAULT_MAX_LATENT_PIXELS} = 184x104, a 1472x832 image)",
    )
    lim.add_argument(
        "--max-abs-input",
        type=float,
        default=DEFAULT_MAX_ABS_INPUT,
        help="largest |value| of any input tensor",
    )
    lim.add_argument("--max-n-noise", type=int, default=8, help="most noise draws a request may ask for")
    lim.add_argument("--request-timeout", type=float, default=300.0, help="seconds to answer a request (504)")
    load = p.add_argument_group("load (beyond these limits requests get 503 with Retry-After)")
    load.add_argument("--max-batch-size", type=int, default=8, help="most rows merged into one forward pass")
    load.add_argument("--max-wait-ms", type=float, default=5.0, help="how long to wait for requests to merge")
    load.add_argument("--max-queue", type=int, default=64, help="most requests waiting for the model")
    load.add_argument("--max-rows-in-flight", type=int, default=256, help="most rows queued or being scored")
    load.add_argument(
        "--max-body-mb-in-flight",
        type=float,
        default=None,
        help="request bodies being received (default 4 x max)",
    )
    load.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds of a 503")
    load.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        help="on SIGTERM: seconds open requests get before they are cancelled (queued ones get 503 at once)",
    )
    return p


def _normalization(spec: str) -> Any:
    if "," in spec:
        offset, scale = spec.split(",", 1)
        return (float(offset), float(scale))
    return spec


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """:class:`ServerSettings` of the command line (the token from ``--token`` or the environment)."""
    text_tokens = args.max_text_tokens
    if text_tokens is None:
        text_tokens = max(DEFAULT_MAX_TEXT_TOKENS, CLIP_MAX_LENGTH + (args.max_sequence_length or 0))
    body_mb = args.max_body_mb_in_flight
    return ServerSettings(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_rows_per_request=args.max_rows_per_request,
        max_n_noise=args.max_n_noise,
        max_text_tokens=text_tokens,
        max_latent_pixels=args.max_latent_pixels,
        max_abs_input=args.max_abs_input,
        max_queue=args.max_queue,
        max_rows_in_flight=args.max_rows_in_flight,
        max_body_bytes_in_flight=None if body_mb is None else int(body_mb * 2**20),
        retry_after_s=args.retry_after,
        request_timeout_s=args.request_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
    )


def build_engine(args: argparse.Namespace):
    """Load the models named by ``args`` and wrap them in a :class:`ScoringEngine`.

    ``--tiny`` is ``--model tiny``; tiny ids (``tiny``, ``tiny-flux``, ``tiny-zimage``, ``:SEED``) build
    the offline tiny models, and ``--pipeline`` defaults to the reward model's own base pipeline.
    """
    import torch

    from dinalrm_align.rewards.dinalrm import DiNaLatentReward
    from dinalrm_align.serving.engine import ScoringEngine
    from dinalrm_align.tiny_pipelines import parse_tiny_id

    model = args.model
    if args.tiny:
        if model is not None and model != "tiny":
            raise ValueError(f"--tiny serves the tiny SD3.5-style models; drop it to serve --model {model}")
        model = "tiny"
    if not model:
        raise ValueError("--model is required (or --tiny for the built-in tiny models)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    tiny = parse_tiny_id(str(model)) is not None
    pipeline = args.pipeline or _default_pipeline(model)
    reward = DiNaLatentReward.from_pretrained(
        model,
        pipeline,
        torch_dtype=dtype,
        device=device,
        u=args.u,
        n_noise=args.n_noise,
        normalization=_normalization(args.normalization),
        max_sequence_length=args.max_sequence_length or (TINY_SEQ_LEN if tiny else 128),
    )
    # The reward model holds its own copy of the first blocks; the server only needs the text
    # encoders, so the full transformer (most of the pipeline's memory) is released.
    reward.pipeline.transformer = None
    return ScoringEngine(reward, model_id=str(model), pipeline_id=str(pipeline))


def _default_pipeline(model: str) -> str:
    """The base pipeline of a reward model: the same tiny id, or its config's ``backbone_model_id``."""
    from dinalrm_align.reward_model.cli_score import default_pipeline

    return default_pipeline(model)


def main(argv: list[str] | None = None) -> int:
    from dinalrm_align.errors import run_cli

    args = build_parser().parse_args(argv)
    return run_cli("serve", lambda: _serve(args), verbose=args.verbose)


def _serve(args: argparse.Namespace) -> int:
    try:
        from dinalrm_align.serving.app import create_app
        from dinalrm_align.serving.runner import RewardServer, exposure_warning, server_config
    except ImportError as exc:
        raise ImportError(f"the server needs the 'serve' extra: pip install 'dinalrm-align[serve]' ({exc})") from exc
    settings = settings_from_args(args)
    engine = build_engine(args)
    warning = exposure_warning(args.host, settings.token)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app = create_app(engine, settings)
    print(
        f"serving {engine.model_id} on http://{args.host}:{args.port} (POST /score, GET /health, GET /info)"
        + (", bearer token required" if settings.token else ""),
        file=sys.stderr,
        flush=True,
    )
    RewardServer(server_config(app, host=args.host, port=args.port, log_level=args.log_level)).run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
