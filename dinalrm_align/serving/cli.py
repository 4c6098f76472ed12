"""`dinalrm-align serve`: serve a latent reward model over HTTP (FastAPI + uvicorn).

    dinalrm-align serve --model liuhuohuo/DiNa-LRM-SD35M-12layers \
        --pipeline stabilityai/stable-diffusion-3.5-medium --host 127.0.0.1 --port 8000
    dinalrm-align serve --tiny --port 8000          # the built-in tiny models (demos, tests)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

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
    src.add_argument("--model", help="reward model: hub id or local folder")
    src.add_argument(
        "--pipeline",
        default="stabilityai/stable-diffusion-3.5-medium",
        help="SD3 pipeline (transformer + text encoders): hub id or local folder",
    )
    src.add_argument("--tiny", action="store_true", help="serve the built-in tiny models (no download)")
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
        help=f"T5 length for prompt requests (default 128; {TINY_SEQ_LEN} with --tiny)",
    )
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--max-batch-size", type=int, default=8, help="most rows merged into one forward pass")
    net.add_argument("--max-wait-ms", type=float, default=5.0, help="how long to wait for requests to merge")
    net.add_argument("--max-request-mb", type=float, default=64.0, help="request body size limit")
    net.add_argument(
        "--max-rows-per-request", type=int, default=64, help="largest batch one request may send"
    )
    net.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _normalization(spec: str) -> Any:
    if "," in spec:
        offset, scale = spec.split(",", 1)
        return (float(offset), float(scale))
    return spec


def build_engine(args: argparse.Namespace):
    """Load the models named by ``args`` and wrap them in a :class:`ScoringEngine`."""
    import torch

    from dinalrm_align.rewards.dinalrm import DiNaLatentReward
    from dinalrm_align.serving.engine import ScoringEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    common = dict(u=args.u, n_noise=args.n_noise, normalization=_normalization(args.normalization))
    if args.tiny:
        from dinalrm_align.testing import tiny_reward_model, tiny_sd3_pipeline

        pipe = tiny_sd3_pipeline(seed=0)
        model = tiny_reward_model(pipe.transformer, seed=0).to_device_dtype(device, dtype)
        pipe.to(device)
        reward = DiNaLatentReward(
            model, pipe, max_sequence_length=args.max_sequence_length or TINY_SEQ_LEN, **common
        )
        return ScoringEngine(reward, model_id="tiny", pipeline_id="tiny")
    if not args.model:
        raise ValueError("--model is required (or --tiny for the built-in tiny models)")
    reward = DiNaLatentReward.from_pretrained(
        args.model,
        args.pipeline,
        torch_dtype=dtype,
        device=device,
        max_sequence_length=args.max_sequence_length or 128,
        **common,
    )
    # The reward model holds its own copy of the first blocks; the server only needs the text
    # encoders, so the full transformer (most of the pipeline's memory) is released.
    reward.pipeline.transformer = None
    return ScoringEngine(reward, model_id=str(args.model), pipeline_id=str(args.pipeline))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from dinalrm_align.serving.app import ServerSettings, create_app
    except ImportError as exc:
        print(
            f"error: the server needs the 'serve' extra: pip install 'dinalrm-align[serve]' ({exc})",
            file=sys.stderr,
        )
        return 1
    try:
        settings = ServerSettings(
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_request_bytes=int(args.max_request_mb * 2**20),
            max_rows_per_request=args.max_rows_per_request,
        )
        engine = build_engine(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    app = create_app(engine, settings)
    print(
        f"serving {engine.model_id} on http://{args.host}:{args.port} (POST /score, GET /health, GET /info)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
