"""Reward server under load and faults: floods, bounded queue and rows, abandoned requests, slow
bodies, concurrent clients with retries, and SIGTERM on a real ``dinalrm-align serve --tiny``.

The worker is held busy deterministically with a gate inside the engine (the real engine scores
once the gate opens), so queue states are exact rather than timing-dependent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from dinalrm_align.rewards import DiNaLatentReward  # noqa: E402
from dinalrm_align.rewards.seeding import request_seeds  # noqa: E402
from dinalrm_align.serving import (  # noqa: E402
    BackgroundServer,
    RemoteRewardError,
    RewardClient,
    ScoringEngine,
    ServerSettings,
    create_app,
)
from dinalrm_align.serving.wire import encode_tensors  # noqa: E402

SEQ = 16
PROMPTS = ["a red cube", "a blue ball", "a green tree", "a yellow car"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class GatedEngine(ScoringEngine):
    """The real engine, but each forward pass first waits for ``gate`` (``entered`` tells it is waiting)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def score_batch(self, requests, max_rows=None):
        self.entered.set()
        assert self.gate.wait(60), "test gate never opened"
        return super().score_batch(requests, max_rows=max_rows)


@pytest.fixture(scope="module")
def local(tiny_rm, tiny_pipe):
    return DiNaLatentReward(tiny_rm, tiny_pipe, u=0.4, max_sequence_length=SEQ)


@pytest.fixture(scope="module")
def batch(tiny_text):
    _, pe, pooled = tiny_text
    latents = torch.randn(4, 16, 32, 32, generator=torch.Generator().manual_seed(11))
    return latents, pe, pooled


def _gated(local) -> GatedEngine:
    return GatedEngine(local, model_id="tiny", pipeline_id="tiny")


def _body(batch, rows: int = 1, start: int = 0) -> bytes:
    latents, pe, pooled = batch
    sl = slice(start, start + rows)
    return encode_tensors(
        {"latents": latents[sl], "prompt_embeds": pe[sl], "pooled_prompt_embeds": pooled[sl]}
    )


def _post(http, url: str, body: bytes, seed: int, timeout: float = 60.0):
    return http.post(
        f"{url}/score",
        content=body,
        params={"seed": seed},
        headers={"content-type": "application/octet-stream"},
        timeout=timeout,
    )


def _until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.02)


def _read_reply(sock: socket.socket) -> str:
    """One HTTP reply from a raw socket: the head, then ``Content-Length`` bytes of body (headers and body
    may arrive in separate segments)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def _info(url: str) -> dict:
    return httpx.get(f"{url}/info", timeout=30).json()


def _expected(local, batch, rows: int, start: int, seed: int) -> torch.Tensor:
    latents, pe, pooled = batch
    sl = slice(start, start + rows)
    return local.score_raw(
        latents=latents[sl],
        prompt_embeds=pe[sl],
        pooled_prompt_embeds=pooled[sl],
        seeds=request_seeds(seed, rows),
    )


# ---------------------------------------------------------------------- flood, queue and rows bounds
def test_flood_gets_503_with_retry_after_and_the_queue_stays_bounded(local, batch):
    engine = _gated(local)
    settings = ServerSettings(
        max_batch_size=1, max_wait_ms=0, max_queue=6, max_rows_in_flight=64, retry_after_s=2
    )
    n_flood = 120
    with (
        BackgroundServer(create_app(engine, settings)) as srv,
        httpx.Client(limits=httpx.Limits(max_connections=64)) as http,
    ):
        body = _body(batch)
        with ThreadPoolExecutor(max_workers=24) as pool:
            first = pool.submit(_post, http, srv.url, body, 0)
            assert engine.entered.wait(30)  # the worker is now inside the first forward pass
            flood = [pool.submit(_post, http, srv.url, body, 1 + i) for i in range(n_flood)]
            # every request beyond the 6 queued ones is answered at once
            _until(lambda: sum(f.done() for f in flood) == n_flood - 6, "the flood to be refused")
            info = _info(srv.url)
            assert info["load"] == {"queued": 6, "rows_in_flight": 7}
            engine.gate.set()
            responses = [f.result(60) for f in flood]
            assert first.result(60).status_code == 200
        busy = [r for r in responses if r.status_code == 503]
        done = [(i, r) for i, r in enumerate(responses) if r.status_code == 200]
        assert len(busy) == n_flood - 6 and len(done) == 6
        for r in busy:
            assert r.headers["retry-after"] == "2" and "queue is full" in r.json()["error"]
        for i, r in done:  # the admitted requests are scored exactly as a local call would
            assert torch.allclose(
                torch.tensor(r.json()["raw"]), _expected(local, batch, 1, 0, 1 + i), atol=1e-5
            )
        stats = _info(srv.url)["stats"]
        assert stats["max_queued"] == 6 and stats["rejected"] == n_flood - 6
        assert stats["max_rows_in_flight"] <= settings.max_rows_in_flight and stats["requests"] == 7
        assert _info(srv.url)["load"] == {"queued": 0, "rows_in_flight": 0}


def test_rows_in_flight_cap_memory(local, batch):
    engine = _gated(local)
    settings = ServerSettings(
        max_batch_size=4, max_wait_ms=0, max_rows_per_request=4, max_rows_in_flight=8, max_queue=50
    )
    with BackgroundServer(create_app(engine, settings)) as srv, httpx.Client() as http:
        with ThreadPoolExecutor(max_workers=4) as pool:
            running = pool.submit(_post, http, srv.url, _body(batch, 4), 1)
            assert engine.entered.wait(30)
            queued = pool.submit(_post, http, srv.url, _body(batch, 4), 2)
            _until(lambda: _info(srv.url)["load"]["rows_in_flight"] == 8, "8 rows in flight")
            refused = _post(http, srv.url, _body(batch, 1), 3)
            assert refused.status_code == 503 and "limit of 8" in refused.json()["error"]
            assert refused.headers["retry-after"] == "1"
            engine.gate.set()
            assert running.result(60).status_code == 200 and queued.result(60).status_code == 200
        again = _post(http, srv.url, _body(batch, 1), 3)  # room again once they are done
        assert again.status_code == 200
        assert torch.allclose(torch.tensor(again.json()["raw"]), _expected(local, batch, 1, 0, 3), atol=1e-5)
        assert _info(srv.url)["stats"]["max_rows_in_flight"] == 8


# ---------------------------------------------------------------------- abandoned work
def test_requests_of_clients_that_gave_up_are_never_computed(local, batch):
    engine = _gated(local)
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0, max_queue=32)
    n_gone = 12
    with BackgroundServer(create_app(engine, settings)) as srv:
        with ThreadPoolExecutor(max_workers=n_gone + 1) as pool, httpx.Client() as http:
            first = pool.submit(_post, http, srv.url, _body(batch), 0)
            assert engine.entered.wait(30)

            def give_up(seed: int) -> str:
                with httpx.Client() as impatient:  # its own connection, closed when it gives up
                    try:
                        _post(impatient, srv.url, _body(batch), seed, timeout=0.5)
                    except httpx.TimeoutException:
                        return "gave up"
                return "answered"

            outcomes = list(pool.map(give_up, range(1, n_gone + 1)))
            assert outcomes == ["gave up"] * n_gone
            _until(
                lambda: _info(srv.url)["stats"]["cancelled"] == n_gone, "the abandoned requests to be dropped"
            )
            assert _info(srv.url)["load"] == {"queued": 0, "rows_in_flight": 1}  # only the running one
            engine.gate.set()
            assert first.result(60).status_code == 200
        stats = _info(srv.url)["stats"]
        assert stats["requests"] == 1 and stats["batches"] == 1  # none of the 12 reached the model


def test_request_timeout_cancels_the_queued_request(local, batch):
    engine = _gated(local)
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0, request_timeout_s=0.5)
    with BackgroundServer(create_app(engine, settings)) as srv, httpx.Client() as http:
        with ThreadPoolExecutor(max_workers=2) as pool:
            running = pool.submit(_post, http, srv.url, _body(batch), 0)
            assert engine.entered.wait(30)
            late = _post(http, srv.url, _body(batch), 1)
            assert late.status_code == 504 and "longer than 0.5 s" in late.json()["error"]
            assert running.result(60).status_code == 504  # its pass had started: it runs to the end
            engine.gate.set()
        _until(lambda: _info(srv.url)["stats"]["requests"] == 1, "the running pass to finish")
        stats = _info(srv.url)["stats"]
        assert stats["cancelled"] == 1 and stats["requests"] == 1


def test_slow_and_broken_bodies_do_not_hold_the_server(local, batch):
    limit = 1 << 20
    settings = ServerSettings(read_timeout_s=0.5, max_request_bytes=limit, max_body_bytes_in_flight=limit)
    with BackgroundServer(
        create_app(ScoringEngine(local, model_id="tiny", pipeline_id="tiny"), settings)
    ) as srv:
        head = (
            f"POST /score HTTP/1.1\r\nHost: {srv.host}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {limit}\r\n\r\n"
        ).encode()
        with socket.create_connection((srv.host, srv.port), timeout=30) as slow:
            slow.sendall(head + b"\0" * 10)  # ... and the rest never comes
            # while it holds the whole body budget, others are told to come back later
            _until(
                lambda: _post(httpx, srv.url, _body(batch), 0).status_code == 503,
                "the body budget to be taken",
            )
            refused = _post(httpx, srv.url, _body(batch), 0)
            reply = _read_reply(slow)
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in reply
        assert refused.status_code == 503 and "request bodies" in refused.json()["error"]
        with socket.create_connection((srv.host, srv.port), timeout=30) as broken:
            broken.sendall(head + b"\0" * 10)  # this client vanishes mid-body
        answers = []
        _until(
            lambda: answers.append(_post(httpx, srv.url, _body(batch), 4)) or answers[-1].status_code == 200,
            "room",
        )
        ok = answers[-1]
        assert torch.allclose(torch.tensor(ok.json()["raw"]), _expected(local, batch, 1, 0, 4), atol=1e-5)
        assert {r.status_code for r in answers} <= {200, 503}


# ---------------------------------------------------------------------- many clients
def test_concurrent_clients_with_retries_all_get_correct_scores(local, batch):
    """More clients than queue slots: some get 503, RewardClient waits Retry-After and retries."""
    settings = ServerSettings(max_batch_size=4, max_wait_ms=10, max_queue=3, retry_after_s=1)
    engine = ScoringEngine(local, model_id="tiny", pipeline_id="tiny")
    latents, pe, pooled = batch
    jobs = [(i % 4, 1 + i % 2, 200 + i) for i in range(24)]  # (start row, rows, seed)
    with BackgroundServer(create_app(engine, settings)) as srv:

        def send(job):
            start, rows, seed = job
            sl = slice(start, start + rows)
            with RewardClient(srv.url, timeout=60, retries=20) as c:
                return c.score(latents[sl], prompt_embeds=pe[sl], pooled_prompt_embeds=pooled[sl], seed=seed)

        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(send, jobs))
        stats = _info(srv.url)["stats"]
    for (start, rows, seed), out in zip(jobs, results):
        rows = out.raw.shape[0]
        assert torch.allclose(out.raw, _expected(local, batch, rows, start, seed), atol=1e-5), (start, seed)
    assert stats["requests"] == len(jobs) and stats["max_queued"] <= 3


def test_client_waits_retry_after_and_retries_a_503(local, batch):
    engine = _gated(local)
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0, max_queue=1, retry_after_s=1)
    latents, pe, pooled = batch
    with BackgroundServer(create_app(engine, settings)) as srv, httpx.Client() as http:
        with ThreadPoolExecutor(max_workers=3) as pool:
            running = pool.submit(_post, http, srv.url, _body(batch), 0)
            assert engine.entered.wait(30)
            queued = pool.submit(_post, http, srv.url, _body(batch), 1)
            _until(lambda: _info(srv.url)["load"]["queued"] == 1, "the queue to fill")
            with (
                RewardClient(srv.url, timeout=60, retries=0) as impatient,
                pytest.raises(RemoteRewardError) as err,
            ):
                impatient.score(latents[:1], prompt_embeds=pe[:1], pooled_prompt_embeds=pooled[:1], seed=5)
            assert err.value.status == 503 and "queue is full" in err.value.message

            def patient():
                with RewardClient(srv.url, timeout=60, retries=5) as c:
                    return c.score(latents[:1], prompt_embeds=pe[:1], pooled_prompt_embeds=pooled[:1], seed=5)

            result = pool.submit(patient)
            _until(lambda: _info(srv.url)["stats"]["rejected"] == 2, "the patient client to be refused once")
            engine.gate.set()  # the queue drains while the client waits Retry-After
            out = result.result(60)
            assert running.result(60).status_code == 200 and queued.result(60).status_code == 200
        assert torch.allclose(out.raw, _expected(local, batch, 1, 0, 5), atol=1e-5)
        assert _info(srv.url)["stats"]["requests"] == 3


# ---------------------------------------------------------------------- SIGTERM on the real command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_sheds_the_queue_and_exits_promptly(tmp_path, tiny_text):
    _, pe, pooled = tiny_text
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "dinalrm_align.cli", "serve", "--tiny", "--port", str(port)]
    command += [
        "--log-level",
        "warning",
        "--max-batch-size",
        "8",
        "--max-queue",
        "64",
        "--shutdown-timeout",
        "5",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        # heavy requests: 8 rows of 64x64 latents each (a full forward pass each, most of a second)
        heavy = encode_tensors(
            {
                "latents": torch.randn(8, 16, 64, 64).half(),
                "prompt_embeds": pe[:1].expand(8, -1, -1),
                "pooled_prompt_embeds": pooled[:1].expand(8, -1),
            }
        )

        def send(seed: int):
            with httpx.Client() as http:
                try:
                    return _post(http, url, heavy, seed, timeout=120).status_code
                except httpx.TransportError:
                    return "closed"

        n = 16
        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(send, s) for s in range(n)]
            _until(lambda: _info(url)["load"]["queued"] >= 8, "a queue to build up", timeout=60)
            queued_at_signal = _info(url)["load"]["queued"]
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(60)  # a hang fails here
            shutdown_s = time.monotonic() - t0
            outcomes = [f.result(60) for f in futures]
        print(f"SIGTERM with {queued_at_signal} queued requests: exited after {shutdown_s:.2f} s; {outcomes}")
        assert returncode in (0, -signal.SIGTERM), log_path.read_text()
        assert set(outcomes) <= {200, 503, "closed"}
        assert outcomes.count(503) >= queued_at_signal - 2  # the queue was shed, not computed
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
