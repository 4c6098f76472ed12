"""The reward server on the FLUX.1 and Z-Image backbones (tiny offline models, loopback): what travels on the
wire for each family, remote == local with the same seeds, embeddings of another backbone refused with a
422 naming the problem, ``/info``, and ``dinalrm-align serve --model tiny-flux / tiny-zimage``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from dinalrm_align.reward_model.text import encode_prompts  # noqa: E402
from dinalrm_align.rewards import CompositeReward, DiNaLatentReward, NoiseSeeding, RemoteLatentReward  # noqa: E402
from dinalrm_align.rewards.seeding import noise_from_seeds, request_seeds  # noqa: E402
from dinalrm_align.serving import BackgroundServer, RewardClient, ScoringEngine, create_app  # noqa: E402
from dinalrm_align.serving.wire import decode_tensors, encode_tensors  # noqa: E402
from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model  # noqa: E402

SEQ = 16
#: Captions of different lengths: Z-Image's embeddings are ragged and travel padded with a mask.
PROMPTS = ["a red cube", "a big blue ball on a green tree", "a yellow car"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["flux", "zimage"])
def setup(request):
    """A running server of one family: (name, local reward, server, text = encode_prompts(PROMPTS))."""
    name = request.param
    pipe = tiny_pipeline(name, seed=0)
    local = DiNaLatentReward(tiny_reward_model(name, pipe, seed=0), pipe, u=0.4, max_sequence_length=SEQ)
    engine = ScoringEngine(DiNaLatentReward(local.model, pipe, u=0.4, max_sequence_length=SEQ),
                           model_id=f"tiny-{name}", pipeline_id=f"tiny-{name}")
    with BackgroundServer(create_app(engine)) as server:
        yield name, local, server, encode_prompts(pipe, PROMPTS, SEQ)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(3, 16, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def sd3_text():
    """Embeddings of another backbone: SD3.5's (B, 77 + L, 32) tokens and (B, 64) pooled vectors."""
    return encode_prompts(tiny_pipeline("sd3", seed=0), PROMPTS, SEQ)


class _Recording(httpx.HTTPTransport):
    """Forwards requests and keeps the bodies of ``POST /score`` (to inspect the wire payload)."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def handle_request(self, request):
        if request.method == "POST":
            self.bodies.append(request.read())
        return super().handle_request(request)


def _post(server, tensors, **params):
    return httpx.post(f"{server.url}/score", content=encode_tensors(tensors), params=params,
                      headers={"content-type": "application/octet-stream"}, timeout=60)


def test_info_reports_the_backbone(setup):
    name, _, server, _ = setup
    with RewardClient(server.url, timeout=60) as client:
        info = client.info()
    assert info["backbone"] == name and info["model"] == f"tiny-{name}"
    assert info["text_width"] == 32 and info["latent_channels"] == 16 and info["latent_multiple"] == 2
    assert info["pooled_width"] == (32 if name == "flux" else None)
    assert info["variable_length_text"] is (name == "zimage")
    # FLUX: no limit; the tiny Z-Image's RoPE table holds 512 rows / columns of 2x2 patches
    assert info["max_latent_size"] == (None if name == "flux" else 1024)


def test_wire_payload_and_remote_equals_local(setup, latents):
    name, local, server, (pe, pooled) = setup
    transport = _Recording()
    with RewardClient(server.url, timeout=60, transport=transport) as client:
        out = client.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seed=7)
    sent = decode_tensors(transport.bodies[-1])
    if name == "zimage":  # no pooled vector; ragged captions padded to the longest, with a mask
        assert pooled is None and set(sent) == {"latents", "prompt_embeds", "prompt_embeds_mask"}
        lengths = [t.shape[0] for t in pe]
        assert sent["prompt_embeds"].shape == (3, max(lengths), 32) and len(set(lengths)) > 1
        assert sent["prompt_embeds_mask"].sum(dim=1).tolist() == lengths
    else:
        assert set(sent) == {"latents", "prompt_embeds", "pooled_prompt_embeds"}
        assert sent["pooled_prompt_embeds"].shape == (3, 32)
    assert out.seeds == request_seeds(7, 3)
    expected = local.score_raw(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, seeds=out.seeds)
    assert torch.allclose(out.raw, expected, atol=1e-5)
    with torch.no_grad():  # and the model itself with that noise, on the unpadded captions
        direct = local.model.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4,
                                   noise=noise_from_seeds(out.seeds, (16, 32, 32)))
    assert torch.allclose(out.raw, direct, atol=1e-5)


def test_prompt_requests_use_the_server_text_stack(setup, latents):
    _, local, server, _ = setup
    with RewardClient(server.url, timeout=60) as client:
        out = client.score(latents, prompts=PROMPTS, seeds=[1, 2, 3], u=0.7)
    expected = local.score_raw(latents=latents, prompts=PROMPTS, seeds=[1, 2, 3], u=0.7)
    assert torch.allclose(out.raw, expected, atol=1e-5)


def test_remote_reward_equals_local_in_a_composite(setup, latents):
    name, local, server, (pe, pooled) = setup
    seeding = NoiseSeeding("sample", 2)
    here = DiNaLatentReward(local.model, local.pipeline, max_sequence_length=SEQ, seeding=seeding)
    there = RemoteLatentReward(server.url, u=0.4, seeding=seeding, pooled_text=name != "zimage")
    comp = CompositeReward({"local": (here, 1.0), "remote": (there, 1.0)})
    by_prompts = comp(latents=latents, prompts=PROMPTS)
    assert torch.allclose(by_prompts["local"], by_prompts["remote"], atol=1e-5)
    by_embeds = comp(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled)  # Z-Image: no pooled
    assert torch.allclose(by_embeds["local"], by_embeds["remote"], atol=1e-5)
    there.close()


def test_embeddings_of_another_backbone_get_422(setup, latents, sd3_text):
    name, _, server, (pe, pooled) = setup
    sd3_pe, sd3_pooled = sd3_text
    with RewardClient(server.url, timeout=60) as client:
        before = client.info()["stats"]["requests"]
    cases = [  # (tensors, fragment of the error)
        ({"latents": latents, "prompt_embeds": sd3_pe, "pooled_prompt_embeds": sd3_pooled},
         "pooled_prompt_embeds width 64 does not fit the flux transformer" if name == "flux"
         else "the zimage backbone takes no pooled_prompt_embeds"),
        ({"latents": latents, "prompt_embeds": torch.zeros(3, 8, 48)},  # another family's token width
         "needs both prompt_embeds and pooled_prompt_embeds" if name == "flux"
         else "prompt_embeds width 48 does not fit the zimage transformer (expects 32)"),
        ({"latents": latents[:, :4], "prompt_embeds": torch.zeros(3, 8, 32)}
         | ({"pooled_prompt_embeds": torch.zeros(3, 32)} if name == "flux" else {}), "channels"),
    ]
    if name == "flux":  # fixed-length text: a mask that marks padding would be ignored, so it is refused
        mask = torch.ones(3, SEQ, dtype=torch.bool)
        mask[0, 5:] = False
        cases.append(({"latents": latents, "prompt_embeds": pe, "pooled_prompt_embeds": pooled,
                       "prompt_embeds_mask": mask}, "reads every text token"))
        cases.append(({"latents": latents, "prompt_embeds": torch.zeros(3, SEQ, 32)}, "needs both"))
    else:  # a mask must match the embeddings and leave every caption a real token
        padded = torch.zeros(3, 12, 32)
        cases.append(({"latents": latents, "prompt_embeds": padded, "prompt_embeds_mask": torch.ones(3, 11, dtype=torch.bool)},
                      "prompt_embeds_mask must have shape (3, 12)"))
        cases.append(({"latents": latents, "prompt_embeds": padded,
                       "prompt_embeds_mask": torch.zeros(3, 12, dtype=torch.bool)}, "at least one real token"))
    for tensors, fragment in cases:
        response = _post(server, tensors, seed=0)
        assert response.status_code == 422, (fragment, response.text)
        assert fragment in response.json()["error"], (fragment, response.text)
    with RewardClient(server.url, timeout=60) as client:
        assert client.info()["stats"]["requests"] == before  # nothing reached the model


# ---------------------------------------------------------------------- dinalrm-align serve --model tiny-*
@pytest.mark.parametrize("name", ["flux", "zimage"])
def test_cli_builds_the_engine_for_tiny_ids(name, latents):
    from dinalrm_align.serving.cli import build_engine, build_parser

    engine = build_engine(build_parser().parse_args(["--model", f"tiny-{name}", "--device", "cpu"]))
    info = engine.info()
    assert info["backbone"] == name and info["model"] == f"tiny-{name}" and info["pipeline"] == f"tiny-{name}"
    assert info["max_sequence_length"] == SEQ  # the tiny models' text length, as with --tiny
    assert engine.reward.pipeline.transformer is None  # released: the reward holds its own blocks
    pipe = tiny_pipeline(name, seed=0)
    local = DiNaLatentReward(tiny_reward_model(name, pipe, seed=0), pipe, max_sequence_length=SEQ)
    raw = engine.reward.score_raw(latents=latents, prompts=PROMPTS, seeds=[4, 5, 6])
    assert torch.allclose(raw, local.score_raw(latents=latents, prompts=PROMPTS, seeds=[4, 5, 6]), atol=1e-5)


def test_cli_refuses_mismatched_models_in_one_line(capsys):
    from dinalrm_align.serving.cli import build_engine, build_parser, main

    with pytest.raises(ValueError, match="needs a FluxTransformer2DModel"):
        build_engine(build_parser().parse_args(["--model", "tiny-flux", "--pipeline", "tiny", "--device", "cpu"]))
    with pytest.raises(ValueError, match="--tiny serves"):
        build_engine(build_parser().parse_args(["--tiny", "--model", "tiny-zimage"]))
    assert main(["--model", "tiny-nope", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dinalrm-align serve: error: unknown tiny model 'tiny-nope'") and "Traceback" not in "\n".join(err)
