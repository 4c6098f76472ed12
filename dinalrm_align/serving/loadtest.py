"""Measure a reward server: throughput, latency, memory under an abandoned flood, SIGTERM time.

    python -m dinalrm_align.serving.loadtest --tiny                 # starts `dinalrm-align serve --tiny`
    python -m dinalrm_align.serving.loadtest --url http://127.0.0.1:8000 [--token T]

Requests carry random latents (``--rows`` x 16 x ``--latent-size``^2) and zero text embeddings of
the server's widths (binary safetensors), with explicit seeds. With ``--tiny`` the server runs in
its own process (so the load generator does not share its interpreter), its resident memory is
read from ``/proc`` and the SIGTERM shutdown is timed. Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def _rss_mb(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of ``pid`` (MiB), from /proc (Linux)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _start_tiny(port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "dinalrm_align.cli", "serve", "--tiny", "--port", str(port)]
    return subprocess.Popen(command + ["--log-level", "warning", *extra], env=env)


def _wait_healthy(http: Any, url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy within {timeout} s")


def _payload(info: dict[str, Any], rows: int, size: int, text_tokens: int) -> bytes:
    import torch

    from dinalrm_align.serving.wire import encode_tensors

    g = torch.Generator().manual_seed(0)
    return encode_tensors(
        {
            "latents": torch.randn(rows, info["latent_channels"], size, size, generator=g),
            "prompt_embeds": torch.zeros(rows, text_tokens, info["text_width"]),
            **({"pooled_prompt_embeds": torch.zeros(rows, info["pooled_width"])} if info.get("pooled_width") else {}),
        }
    )


def throughput(http: Any, url: str, body: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    """``requests`` requests from ``concurrency`` threads: requests/s, latency percentiles, statuses."""

    def one(i: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = http.post(
            f"{url}/score",
            content=body,
            params={"seed": i},
            headers={"content-type": "application/octet-stream"},
            timeout=300,
        )
        return r.status_code, time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ok = sorted(t for s, t in results if s == 200)
    statuses: dict[str, int] = {}
    for s, _ in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {
        "requests": requests,
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 1),
        "latency_ms_p50": round(1000 * statistics.median(ok), 1) if ok else None,
        "latency_ms_p95": round(1000 * ok[int(0.95 * (len(ok) - 1))], 1) if ok else None,
        "statuses": statuses,
    }


def abandoned_flood(http: Any, url: str, body: bytes, requests: int, give_up_s: float) -> dict[str, Any]:
    """``requests`` requests whose clients give up after ``give_up_s``; what the server did with them."""
    import httpx

    def one(i: int) -> str:
        with httpx.Client() as own:
            try:
                r = own.post(
                    f"{url}/score",
                    content=body,
                    params={"seed": i},
                    headers={"content-type": "application/octet-stream"},
                    timeout=give_up_s,
                )
                return str(r.status_code)
            except httpx.TimeoutException:
                return "gave up"

    before = http.get(f"{url}/info").json()["stats"]
    with ThreadPoolExecutor(max_workers=min(64, requests)) as pool:
        outcomes = list(pool.map(one, range(requests)))
    time.sleep(1.0)  # let the server notice the last disconnects and finish its pass
    after = http.get(f"{url}/info").json()["stats"]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return {
        "requests": requests,
        "give_up_s": give_up_s,
        "outcomes": counts,
        "computed": after["requests"] - before["requests"],
        "dropped_unstarted": after["cancelled"] - before["cancelled"],
        "gone_before_queue": after["client_gone_before_queue"] - before["client_gone_before_queue"],
        "refused_503": after["rejected"] - before["rejected"],
        "max_queued": after["max_queued"],
        "max_rows_in_flight": after["max_rows_in_flight"],
    }


def sigterm(proc: subprocess.Popen, http: Any, url: str, body: bytes, requests: int) -> dict[str, Any]:
    """Queue ``requests`` requests, send SIGTERM, time the exit and count the answers."""
    import httpx

    def one(i: int) -> str:
        with httpx.Client() as own:
            try:
                return str(
                    own.post(
                        f"{url}/score",
                        content=body,
                        params={"seed": i},
                        headers={"content-type": "application/octet-stream"},
                        timeout=300,
                    ).status_code
                )
            except httpx.TransportError:
                return "closed"

    with ThreadPoolExecutor(max_workers=requests) as pool:
        futures = [pool.submit(one, i) for i in range(requests)]
        deadline = time.monotonic() + 60
        while (
            http.get(f"{url}/info").json()["load"]["queued"] < requests // 2 and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        queued = http.get(f"{url}/info").json()["load"]["queued"]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        exit_s = time.monotonic() - t0
        outcomes = [f.result() for f in futures]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return {"queued_at_sigterm": queued, "exit_s": round(exit_s, 2), "outcomes": counts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dinalrm_align.serving.loadtest", description=__doc__.split("\n")[0]
    )
    p.add_argument("--url", help="a running server (else --tiny)")
    p.add_argument("--tiny", action="store_true", help="start `dinalrm-align serve --tiny` in a subprocess")
    p.add_argument("--token", default=None, help="bearer token (default: $DINALRM_SERVER_TOKEN)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="rows per request (one run each)")
    p.add_argument("--latent-size", type=int, default=32, help="latent side (32 = a 256 px image)")
    p.add_argument("--text-tokens", type=int, default=93, help="length of prompt_embeds (tiny: 77 + 16)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--flood", type=int, default=200, help="abandoned-flood size (0: skip)")
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.tiny):
        p.error("pass exactly one of --url and --tiny")

    import httpx

    from dinalrm_align.serving.settings import TOKEN_ENV

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    proc = None
    if args.tiny:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = _start_tiny(port, [])
        url = f"http://127.0.0.1:{port}"
    else:
        url = args.url.rstrip("/")
    report: dict[str, Any] = {
        "url": url,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(
            ["python -m dinalrm_align.serving.loadtest", *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    try:
        with httpx.Client(headers=headers, limits=httpx.Limits(max_connections=64)) as http:
            _wait_healthy(http, url)
            info = http.get(f"{url}/info").json()
            report["server"] = {
                k: info[k]
                for k in ("model", "device", "dtype", "max_batch_size", "max_queue", "max_rows_in_flight")
            }
            if proc is not None:
                report["rss_idle_mb"] = _rss_mb(proc.pid)
            for rows in args.rows:
                body = _payload(info, rows, args.latent_size, args.text_tokens)
                throughput(http, url, body, min(20, args.requests), args.concurrency)  # warm-up
                run = throughput(http, url, body, args.requests, args.concurrency)
                report[f"rows_{rows}"] = {"latent": [rows, 16, args.latent_size, args.latent_size], **run}
            if args.flood:
                body = _payload(info, 1, args.latent_size, args.text_tokens)
                report["abandoned_flood"] = abandoned_flood(http, url, body, args.flood, give_up_s=0.2)
            if proc is not None:
                report["rss_after_mb"] = _rss_mb(proc.pid)
                heavy = _payload(info, 8, 64, args.text_tokens)
                report["sigterm"] = sigterm(proc, http, url, heavy, 16)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
