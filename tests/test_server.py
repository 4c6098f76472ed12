"""Reward server on loopback: good / bad / concurrent requests, remote == local, micro-batching, CLI,
abusive payloads (4xx before any compute), bearer token. Load and shutdown: tests/test_server_load.py."""

from __future__ import annotations

import base64
import json
import os
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

from dinalrm_align.rewards import CompositeReward, DiNaLatentReward, NoiseSeeding, RemoteLatentReward  # noqa: E402
from dinalrm_align.rewards.seeding import noise_from_seeds, request_seeds  # noqa: E402
from dinalrm_align.serving import (  # noqa: E402
    BackgroundServer,
    MicroBatcher,
    RemoteRewardError,
    RewardClient,
    ScoringEngine,
    ServerSettings,
    create_app,
)
from dinalrm_align.serving.wire import build_request, encode_tensors  # noqa: E402
from dinalrm_align.tiny import tiny_reward_model  # noqa: E402

SEQ = 16
PROMPTS = ["a red cube", "a blue ball", "a green tree", "a yellow car"]
MAX_BYTES = 1 << 20
MAX_TOKENS = 77 + SEQ + 7  # the tiny text is 93 tokens long
MAX_LATENT_PIXELS = 32 * 32  # the tiny model's grid allows 64 x 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local(tiny_rm, tiny_pipe):
    return DiNaLatentReward(tiny_rm, tiny_pipe, u=0.4, max_sequence_length=SEQ)


@pytest.fixture(scope="module")
def engine(local):
    reward = DiNaLatentReward(local.model, local.pipeline, u=0.4, max_sequence_length=SEQ)
    return ScoringEngine(reward, model_id="tiny", pipeline_id="tiny")


@pytest.fixture(scope="module")
def server(engine):
    settings = ServerSettings(
        max_batch_size=8,
        max_wait_ms=30,
        max_request_bytes=MAX_BYTES,
        max_rows_per_request=8,
        max_text_tokens=MAX_TOKENS,
        max_latent_pixels=MAX_LATENT_PIXELS,
    )
    with BackgroundServer(create_app(engine, settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def batch(tiny_text):
    prompts, pe, pooled = tiny_text
    latents = torch.randn(4, 16, 32, 32, generator=torch.Generator().manual_seed(3))
    return latents, pe, pooled


def _post_binary(server, tensors, **params):
    return httpx.post(
        f"{server.url}/score",
        content=encode_tensors(tensors),
        params=params,
        headers={"content-type": "application/octet-stream"},
        timeout=60,
    )


def _post_json(server, body):
    return httpx.post(f"{server.url}/score", json=body, timeout=60)


def _b64(tensors):
    return base64.b64encode(encode_tensors(tensors)).decode()


# ---------------------------------------------------------------------- good requests
def test_health_and_info(client, server):
    assert server.host == "127.0.0.1" and server.port > 0
    assert client.health() == {"status": "ok"}
    info = client.info()
    assert info["model"] == "tiny" and info["dtype"] == "float32" and info["u"] == 0.4
    assert info["normalization"] == {"name": "display", "offset": 10.0, "scale": 10.0}
    assert info["max_batch_size"] == 8 and info["max_request_bytes"] == MAX_BYTES
    assert 0 < info["sigma"] < 1 and info["latent_channels"] == 16


def test_binary_request_equals_local_scores(client, batch, local, tiny_rm):
    latents, pe, pooled = batch
    out = client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seed=5)
    assert out.seeds == request_seeds(5, 4)
    expected = local.score_raw(
        latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seeds=out.seeds
    )
    assert torch.allclose(out.raw, expected, atol=1e-5)
    assert torch.allclose(out.score, (out.raw + 10) / 10, atol=1e-6)
    # and the model itself with that noise
    with torch.no_grad():
        direct = tiny_rm.score(
            latents,
            prompt_embeds=pe,
            pooled_prompt_embeds=pooled,
            u=0.4,
            noise=noise_from_seeds(out.seeds, (16, 32, 32)),
        )
    assert torch.allclose(out.raw, direct, atol=1e-5)


def test_json_prompts_request_equals_local_scores(client, batch, local):
    latents, _, _ = batch
    out = client.score(latents, prompts=PROMPTS, seeds=[1, 2, 3, 4], u=0.7, n_noise=2)
    assert out.seeds == [1, 2, 3, 4] and out.u == 0.7 and out.n_noise == 2
    expected = local.score_raw(latents=latents, prompts=PROMPTS, seeds=[1, 2, 3, 4], u=0.7, n_noise=2)
    assert torch.allclose(out.raw, expected, atol=1e-5)


def test_seeds_make_scores_replayable(client, batch):
    latents, pe, pooled = batch
    a = client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seed=1)
    b = client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seed=1)
    c = client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seed=2)
    assert torch.allclose(a.raw, b.raw, atol=1e-6) and not torch.allclose(a.raw, c.raw)
    free = client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled)
    replay = client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seeds=free.seeds)
    assert torch.allclose(free.raw, replay.raw, atol=1e-6)
    assert len(set(free.seeds)) == 4


def test_half_precision_payloads_are_accepted(client, batch, local):
    latents, pe, pooled = batch
    out = client.score(
        latents.half(), prompt_embeds=pe.bfloat16(), pooled_prompt_embeds=pooled.half(), seed=0
    )
    expected = local.score_raw(
        latents=latents.half().float(),
        prompt_embeds=pe.bfloat16().float(),
        pooled_prompt_embeds=pooled.half().float(),
        seeds=out.seeds,
    )
    assert torch.allclose(out.raw, expected, atol=1e-5)


# ---------------------------------------------------------------------- bad requests
def test_malformed_payloads_get_clear_4xx(server, batch, client):
    latents, pe, pooled = batch
    good = {"latents": latents, "prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    cases = [
        (
            lambda: httpx.post(
                f"{server.url}/score",
                content=b"not safetensors at all",
                headers={"content-type": "application/octet-stream"},
            ),
            400,
            "safetensors",
        ),
        (
            lambda: httpx.post(f"{server.url}/score", content=b"x", headers={"content-type": "text/plain"}),
            415,
            "Content-Type",
        ),
        (
            lambda: httpx.post(
                f"{server.url}/score", content=b"{nope", headers={"content-type": "application/json"}
            ),
            400,
            "JSON",
        ),
        (lambda: _post_json(server, {"tensors": "%%%", "prompts": PROMPTS}), 400, "base64"),
        (lambda: _post_json(server, {"prompts": PROMPTS}), 422, "tensors"),
        (
            lambda: _post_json(
                server, {"tensors": _b64({"latents": latents}), "prompts": PROMPTS, "extra": 1}
            ),
            422,
            "unknown JSON fields",
        ),
        (
            lambda: _post_json(server, {"tensors": _b64({"latents": latents}), "prompts": PROMPTS[:3]}),
            422,
            "3 prompts",
        ),
        (
            lambda: _post_json(server, {"tensors": _b64({"latents": latents}), "prompts": [1, 2, 3, 4]}),
            422,
            "strings",
        ),
        (
            lambda: _post_json(server, {"tensors": _b64({"latents": latents}), "prompts": PROMPTS, "u": 1.5}),
            422,
            "u must lie",
        ),
        (
            lambda: _post_json(
                server, {"tensors": _b64({"latents": latents}), "prompts": PROMPTS, "seeds": [1]}
            ),
            422,
            "seeds",
        ),
        (
            lambda: _post_json(
                server, {"tensors": _b64({"latents": latents}), "prompts": PROMPTS, "n_noise": 99}
            ),
            422,
            "n_noise",
        ),
        (lambda: _post_binary(server, {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}), 422, "latents"),
        (lambda: _post_binary(server, {"latents": latents}), 422, "text conditions"),
        (lambda: _post_binary(server, {"latents": latents, "prompt_embeds": pe}), 422, "both"),
        (lambda: _post_binary(server, {**good, "latents": latents[:, :4]}), 422, "channels"),
        (lambda: _post_binary(server, {**good, "latents": latents[:, :, :31, :31]}), 422, "multiples of 2"),
        (lambda: _post_binary(server, {**good, "latents": latents.to(torch.int32)}), 422, "float"),
        (lambda: _post_binary(server, {**good, "latents": latents[0]}), 422, "4-D"),
        (
            lambda: _post_binary(server, {**good, "latents": torch.full_like(latents, float("nan"))}),
            422,
            "NaN",
        ),
        (lambda: _post_binary(server, {**good, "pooled_prompt_embeds": pooled[:2]}), 422, "batch sizes"),
        (lambda: _post_binary(server, {**good, "prompt_embeds": pe[..., :8]}), 422, "prompt_embeds width 8 does not fit"),
        (lambda: _post_binary(server, {**good, "other": pe}), 422, "unknown tensors"),
        (lambda: _post_binary(server, good, u="abc"), 422, "not a number"),
        (lambda: _post_binary(server, good, u=-0.1), 422, "u must lie"),
        (lambda: _post_binary(server, good, temperature=1), 422, "unknown query"),
        (lambda: _post_binary(server, {**good, "seeds": torch.zeros(4)}), 422, "int64"),
        (
            lambda: _post_binary(
                server,
                {
                    "latents": torch.zeros(9, 16, 8, 8),
                    "prompt_embeds": torch.zeros(9, 93, 32),
                    "pooled_prompt_embeds": torch.zeros(9, 64),
                },
            ),
            413,
            "limit",
        ),
        (
            lambda: httpx.post(
                f"{server.url}/score",
                content=b"\0" * (MAX_BYTES + 1),
                headers={"content-type": "application/octet-stream"},
            ),
            413,
            "exceeds",
        ),
    ]
    for send, status, fragment in cases:
        response = send()
        assert response.status_code == status, (fragment, response.text)
        assert fragment in response.json()["error"], (fragment, response.text)
    missing = httpx.get(f"{server.url}/nowhere")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert httpx.put(f"{server.url}/score").json() == {"error": "Method Not Allowed"}
    # the server is still healthy and scoring
    assert client.health()["status"] == "ok"
    assert client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seed=0).raw.shape == (4,)


def _raw_json(server, text: str):
    return httpx.post(
        f"{server.url}/score", content=text.encode(), headers={"content-type": "application/json"}, timeout=60
    )


def test_abusive_payloads_get_4xx_before_any_compute(server, batch, client):
    """Each of these once held the worker, crashed with a 500 or answered NaN; now a 4xx, never computed."""
    latents, pe, pooled = batch
    good = {"latents": latents, "prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    lat_b64 = _b64({"latents": latents})
    before = client.info()["stats"]
    cases = [
        # sizes: refused on the shapes (the 20,000-token request once held the worker for minutes)
        (
            lambda: _post_binary(
                server,
                {
                    "latents": latents[:1],
                    "prompt_embeds": torch.zeros(1, 12_000, 32).half(),
                    "pooled_prompt_embeds": pooled[:1],
                },
            ),
            413,
            "tokens",
        ),
        (
            lambda: _post_binary(server, {**good, "prompt_embeds": torch.zeros(4, MAX_TOKENS + 1, 32)}),
            413,
            "tokens",
        ),
        (
            lambda: _post_binary(server, {**good, "latents": torch.zeros(4, 16, 64, 64).half()}),
            413,
            f"limit of {MAX_LATENT_PIXELS}",
        ),
        # malformed JSON / numbers / text
        (lambda: _raw_json(server, "[" * 100_000 + "]" * 100_000), 400, "nested too deeply"),
        (lambda: _raw_json(server, '{"a":' * 50_000 + "1" + "}" * 50_000), 400, "nested too deeply"),
        (
            lambda: _raw_json(
                server, f'{{"tensors": "{lat_b64}", "prompts": {json.dumps(PROMPTS)}, "seed": {"9" * 5000}}}'
            ),
            400,
            "integer",
        ),
        (
            lambda: _post_json(server, {"tensors": lat_b64, "prompts": PROMPTS, "seed": 2**64}),
            422,
            "seed must lie",
        ),
        (
            lambda: _post_json(server, {"tensors": lat_b64, "prompts": PROMPTS, "seeds": [2**70, 1, 2, -1]}),
            422,
            "seeds[0]",
        ),
        (
            lambda: _post_json(server, {"tensors": lat_b64, "prompts": PROMPTS, "n_noise": 10**40}),
            422,
            "n_noise",
        ),
        (lambda: _post_binary(server, good, seed=str(2**64)), 422, "seed must lie"),
        (
            lambda: _raw_json(server, f'{{"tensors": "{lat_b64}", "prompts": ["\\ud800", "b", "c", "d"]}}'),
            422,
            "not valid Unicode",
        ),
        # empty dimensions
        (lambda: _post_binary(server, {**good, "latents": torch.zeros(4, 16, 0, 0)}), 422, "size 0"),
        (lambda: _post_binary(server, {**good, "latents": torch.zeros(0, 16, 32, 32)}), 422, "size 0"),
        (lambda: _post_binary(server, {**good, "prompt_embeds": torch.zeros(4, 0, 32)}), 422, "size 0"),
        (lambda: _post_binary(server, {**good, "pooled_prompt_embeds": torch.zeros(4, 0)}), 422, "size 0"),
        # finite but absurd values (1e30 once came back as NaN scores)
        (lambda: _post_binary(server, {**good, "latents": torch.full_like(latents, 1e30)}), 422, "magnitude"),
        (lambda: _post_binary(server, {**good, "latents": latents * 2e4}), 422, "|value| <= 10000"),
        (lambda: _post_binary(server, {**good, "prompt_embeds": pe * 1e30}), 422, "magnitude"),
        (
            lambda: _post_binary(
                server, {**good, "pooled_prompt_embeds": torch.full_like(pooled, 2e4).half()}
            ),
            422,
            "magnitude",
        ),
        (
            lambda: _post_binary(server, {"latents": latents, "pooled_prompt_embeds": pooled}),
            422,
            "needs prompt_embeds",
        ),
    ]
    for send, status, fragment in cases:
        response = send()
        assert response.status_code == status, (fragment, response.text)
        assert fragment in response.json()["error"], (fragment, response.text)
    after = client.info()["stats"]
    assert after["requests"] == before["requests"] and after["batches"] == before["batches"]
    # the longest accepted text and the largest accepted latent still score
    assert client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seed=0).raw.shape == (4,)
    longest = torch.cat([pe, torch.zeros(4, MAX_TOKENS - pe.shape[1], 32)], dim=1)
    out = client.score(latents[:1], prompt_embeds=longest[:1], pooled_prompt_embeds=pooled[:1], seed=0)
    assert out.raw.shape == (1,) and torch.isfinite(out.raw).all()


def test_non_finite_scores_are_refused_not_sent(tiny_pipe, batch):
    """A model that overflows (here: a head with absurd weights) gets 422, never NaN in the JSON."""
    broken = tiny_reward_model(tiny_pipe.transformer, seed=0)  # a private copy of the fixture's model
    with torch.no_grad():
        broken.reward_head.head.weight.fill_(3e38)
        broken.reward_head.head.bias.fill_(3e38)
    reward = DiNaLatentReward(broken, tiny_pipe, u=0.4, max_sequence_length=SEQ)
    app = create_app(ScoringEngine(reward, model_id="broken", pipeline_id="tiny"))
    latents, pe, pooled = batch
    with BackgroundServer(app) as srv:
        response = _post_binary(
            srv, {"latents": latents, "prompt_embeds": pe, "pooled_prompt_embeds": pooled}
        )
    assert response.status_code == 422, response.text
    message = json.loads(response.text, parse_constant=lambda c: pytest.fail(f"{c} in the reply"))["error"]
    assert "finite" in message or "NaN" in message


def test_client_raises_remote_errors(client, batch):
    latents, pe, pooled = batch
    with pytest.raises(RemoteRewardError) as err:
        client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=2.0)
    assert err.value.status == 422 and "u must lie" in err.value.message
    with pytest.raises(ValueError, match="not both"):
        client.score(latents, prompts=PROMPTS, prompt_embeds=pe)


# ---------------------------------------------------------------------- concurrency / micro-batching
def test_concurrent_requests_are_correct_and_merged(client, server, batch, local):
    latents, pe, pooled = batch
    before = client.info()["stats"]
    jobs = [(i % 4, 1 + i % 2, 100 + i) for i in range(12)]  # (start row, rows, seed)

    def send(job):
        start, rows, seed = job
        sl = slice(start, start + rows)
        with RewardClient(server.url, timeout=60) as c:
            if seed % 3 == 0:  # mix prompt requests in: they are merged among themselves
                return c.score(latents[sl], prompts=PROMPTS[sl], seed=seed)
            return c.score(latents[sl], prompt_embeds=pe[sl], pooled_prompt_embeds=pooled[sl], seed=seed)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(send, jobs))
    for (start, rows, seed), out in zip(jobs, results):
        sl = slice(start, start + rows)
        expected = local.score_raw(
            latents=latents[sl],
            prompt_embeds=pe[sl],
            pooled_prompt_embeds=pooled[sl],
            seeds=request_seeds(seed, out.raw.shape[0]),
        )
        assert torch.allclose(out.raw, expected, atol=1e-5), (start, rows, seed)
    stats = client.info()["stats"]
    assert stats["requests"] - before["requests"] == len(jobs)
    assert stats["max_merged_requests"] >= 2
    assert stats["max_merged_rows"] <= 8


def test_engine_chunks_big_groups_without_changing_scores(engine, batch):
    latents, pe, pooled = batch

    reqs = [
        build_request(
            {"latents": latents[:3], "prompt_embeds": pe[:3], "pooled_prompt_embeds": pooled[:3]},
            seed=1,
            max_rows=8,
            max_n_noise=1,
        ),
        build_request(
            {"latents": latents[3:], "prompt_embeds": pe[3:], "pooled_prompt_embeds": pooled[3:]},
            seed=2,
            max_rows=8,
            max_n_noise=1,
        ),
    ]
    whole = engine.score_batch(reqs)
    chunked = engine.score_batch(reqs, max_rows=2)
    assert [t.shape for t in chunked] == [(3,), (1,)]
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-5)


def test_micro_batcher_merges_by_key_and_isolates_failures():
    release = threading.Event()
    calls: list[list[tuple[str, int]]] = []

    def process(items):
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(5)
        if any(v < 0 for _, v in items):
            raise ValueError("negative")
        return [v * 10 for _, v in items]

    batcher = MicroBatcher(
        process, key=lambda it: it[0], rows=lambda it: 1, max_batch_size=3, max_wait_s=0.05
    )
    batcher.start()
    try:
        first = batcher.submit(("a", 0))
        time.sleep(0.1)  # the worker is now blocked inside the first call
        futures = [batcher.submit(item) for item in [("a", 1), ("b", 2), ("a", 3), ("a", -4), ("a", 5)]]
        release.set()
        assert first.result(5) == 0
        assert [f.result(5) for f in futures if f is not futures[3]] == [10, 20, 30, 50]
        with pytest.raises(ValueError, match="negative"):
            futures[3].result(5)
    finally:
        batcher.stop()
    assert not batcher.running
    merged = [c for c in calls[1:] if len(c) > 1]
    assert merged and all(len({k for k, _ in c}) == 1 and len(c) <= 3 for c in calls)
    assert batcher.stats.failures == 1
    with pytest.raises(RuntimeError, match="not running"):
        batcher.submit(("a", 1))


# ---------------------------------------------------------------------- remote reward
def test_remote_reward_equals_local_in_a_composite(server, batch, local):
    latents, pe, pooled = batch
    seeding = NoiseSeeding("sample", 3)
    here = DiNaLatentReward(local.model, local.pipeline, u=0.4, max_sequence_length=SEQ, seeding=seeding)
    there = RemoteLatentReward(server.url, u=0.4, seeding=seeding)
    comp = CompositeReward({"local": (here, 1.0), "remote": (there, 1.0)})
    assert not comp.differentiable
    out = comp(latents=latents, prompts=PROMPTS)  # prompts mode: the server encodes the text
    assert torch.allclose(out["local"], out["remote"], atol=1e-5)
    by_embeds = there(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, prompts=PROMPTS)
    assert torch.allclose(by_embeds, out["local"], atol=1e-5)
    embeds_only = RemoteLatentReward(server.url, send="embeddings", normalization="raw")
    raw = embeds_only(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled)
    expected = DiNaLatentReward(local.model, normalization="raw")(
        latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled
    )
    assert torch.allclose(raw, expected, atol=1e-5)
    with pytest.raises(ValueError, match="pass prompt_embeds"):
        embeds_only(latents=latents, prompts=PROMPTS)
    there.close()
    embeds_only.close()


def test_settings_refuse_inconsistent_limits():
    from dinalrm_align.serving.settings import DEFAULT_MAX_LATENT_PIXELS, DEFAULT_MAX_TEXT_TOKENS

    assert DEFAULT_MAX_TEXT_TOKENS == 77 + 128 and DEFAULT_MAX_LATENT_PIXELS == 184 * 104
    with pytest.raises(ValueError, match="max_rows_in_flight"):
        ServerSettings(max_rows_per_request=64, max_rows_in_flight=8)
    with pytest.raises(ValueError, match="max_queue"):
        ServerSettings(max_queue=0)
    with pytest.raises(ValueError, match="max_body_bytes_in_flight"):
        ServerSettings(max_request_bytes=1 << 20, max_body_bytes_in_flight=1 << 10)
    with pytest.raises(ValueError, match="max_abs_input"):
        ServerSettings(max_abs_input=float("inf"))
    with pytest.raises(ValueError, match="token"):
        ServerSettings(token=" ")
    assert ServerSettings(max_request_bytes=1 << 20).body_bytes_in_flight == 4 << 20


# ---------------------------------------------------------------------- access control
def test_bearer_token_guards_every_endpoint(engine, batch, local, monkeypatch):
    from dinalrm_align.serving.settings import TOKEN_ENV

    token = "s3cret-token"
    latents, pe, pooled = batch
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    app = create_app(engine, ServerSettings(token=token))
    assert token not in repr(app.state.settings)
    with BackgroundServer(app) as srv:
        for method, path in [("GET", "/health"), ("GET", "/info"), ("POST", "/score"), ("GET", "/nowhere")]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": token}]:
                response = httpx.request(method, f"{srv.url}{path}", headers=headers, timeout=30)
                assert response.status_code == 401, (path, headers, response.text)
                assert (
                    "Bearer" in response.json()["error"] and response.headers["www-authenticate"] == "Bearer"
                )
        ok = httpx.get(f"{srv.url}/info", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["auth"] is True and token not in ok.text
        with RewardClient(srv.url) as anonymous, pytest.raises(RemoteRewardError) as err:
            anonymous.info()
        assert err.value.status == 401
        with RewardClient(srv.url, token=token) as c:
            out = c.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seed=3)
        expected = local.score_raw(
            latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seeds=out.seeds
        )
        assert torch.allclose(out.raw, expected, atol=1e-5)
        monkeypatch.setenv(TOKEN_ENV, token)  # the client (and the remote reward) read it by default
        remote = RemoteLatentReward(srv.url, u=0.4, normalization="raw")
        here = DiNaLatentReward(
            local.model, local.pipeline, u=0.4, max_sequence_length=SEQ, normalization="raw"
        )
        assert torch.allclose(
            remote(latents=latents, prompts=PROMPTS), here(latents=latents, prompts=PROMPTS), atol=1e-5
        )
        remote.close()
        explicit = RemoteLatentReward(srv.url, token="wrong", normalization="raw")
        with pytest.raises(RemoteRewardError, match="401"):
            explicit(latents=latents, prompts=PROMPTS)
        explicit.close()


def test_open_bind_without_token_warns(engine, monkeypatch):
    from dinalrm_align.serving.cli import build_parser, settings_from_args
    from dinalrm_align.serving.runner import exposure_warning, is_loopback
    from dinalrm_align.serving.settings import TOKEN_ENV

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", "tok") is None
    message = exposure_warning("0.0.0.0", None)
    assert message and "0.0.0.0" in message and TOKEN_ENV in message and "--token" in message
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert settings_from_args(build_parser().parse_args(["--tiny"])).token == "from-env"
    assert settings_from_args(build_parser().parse_args(["--tiny", "--token", "flag"])).token == "flag"
    monkeypatch.delenv(TOKEN_ENV)
    defaults = settings_from_args(build_parser().parse_args(["--tiny"]))
    assert defaults.token is None and defaults.max_text_tokens == 77 + 128
    assert defaults.max_latent_pixels == (1472 // 8) * (832 // 8)
    longer = settings_from_args(build_parser().parse_args(["--tiny", "--max-sequence-length", "256"]))
    assert longer.max_text_tokens == 77 + 256
    with pytest.warns(UserWarning, match="reachable from other machines"):
        BackgroundServer(create_app(engine), host="0.0.0.0")  # constructed, never started


# ---------------------------------------------------------------------- command line
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_requires_a_model():
    from dinalrm_align.serving.cli import main

    assert main(["--port", "1"]) == 2


def test_cli_loads_model_and_pipeline_folders(tmp_path, tiny_rm, tiny_pipe, batch, local):
    """The non-tiny path: --model / --pipeline folders (the layouts save_pretrained writes)."""
    from dinalrm_align.serving.cli import build_engine, build_parser

    tiny_rm.save_pretrained(tmp_path / "rm")
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    args = build_parser().parse_args(
        ["--model", str(tmp_path / "rm"), "--pipeline", str(tmp_path / "pipe"), "--device", "cpu"]
        + ["--max-sequence-length", str(SEQ), "--normalization", "12,10"]
    )
    engine = build_engine(args)
    assert engine.reward.pipeline.transformer is None  # released: the reward holds its own blocks
    info = engine.info()
    assert info["model"] == str(tmp_path / "rm") and info["normalization"]["offset"] == 12.0
    latents, pe, pooled = batch
    raw = engine.reward.score_raw(latents=latents, prompts=PROMPTS, seeds=[1, 2, 3, 4])
    assert torch.allclose(
        raw, local.score_raw(latents=latents, prompts=PROMPTS, seeds=[1, 2, 3, 4]), atol=1e-5
    )
    bad = build_parser().parse_args(
        ["--model", str(tmp_path / "missing"), "--pipeline", str(tmp_path / "pipe")]
    )
    with pytest.raises((FileNotFoundError, ValueError)):
        build_engine(bad)


def test_cli_serves_the_tiny_models(batch, tmp_path, local):
    latents, pe, pooled = batch
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dinalrm_align.cli",
            "serve",
            "--tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        with RewardClient(url, timeout=60) as c:
            info = c.info()
            assert info["model"] == "tiny" and info["max_sequence_length"] == SEQ
            out = c.score(latents[:2], prompts=PROMPTS[:2], seed=0)
            assert out.raw.shape == (2,) and json.dumps(out.seeds)
            expected = local.score_raw(latents=latents[:2], prompts=PROMPTS[:2], seeds=out.seeds)
            assert torch.allclose(out.raw, expected, atol=1e-5)  # the same tiny models as tests/conftest.py
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
