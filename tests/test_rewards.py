"""Reward plug-ins: protocol, seeding, normalisation, composition, pixel bridge, trainer adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinalrm_align.reward_model.images import encode_images
from dinalrm_align.rewards import (
    CompositeReward,
    DifferentiableLatentReward,
    DiNaLatentReward,
    LatentReward,
    NoiseSeeding,
    PixelBridge,
    RemoteLatentReward,
    ScoreNormalization,
    build_composite,
    ddpo_reward_fn,
    flow_grpo_latent_reward,
    flow_grpo_reward,
    images_to_latents,
    resolve_normalization,
)
from dinalrm_align.rewards.frameworks import LatentRewardBackend, PointwiseLatentRewardModel
from dinalrm_align.rewards.seeding import hash_seed, noise_from_seeds, request_seeds

SEQ = 16
PROMPTS = ["a red cube", "a blue ball", "a red cube", "a yellow car"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (and do not fight other jobs for the 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(4, 16, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reward(tiny_rm, tiny_pipe):
    return DiNaLatentReward(tiny_rm, tiny_pipe, u=0.4, max_sequence_length=SEQ)


@pytest.fixture(scope="module")
def text(tiny_pipe):
    from dinalrm_align import encode_prompts

    return encode_prompts(tiny_pipe, PROMPTS, max_sequence_length=SEQ)


@pytest.fixture(scope="module")
def images(tiny_pipe, latents):
    """Decoded SD3 images (4, 3, 64, 64) in [0, 1], as Flow-GRPO hands them over."""
    vae = tiny_pipe.vae
    with torch.no_grad():
        x = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    return (x / 2 + 0.5).clamp(0, 1)


class _FakeClient:
    url = "http://127.0.0.1:1"

    def close(self):
        pass


# ---------------------------------------------------------------------- protocol
def test_protocols_and_declared_fields(reward, tiny_rm):
    assert isinstance(reward, LatentReward)
    assert isinstance(reward, DifferentiableLatentReward)
    assert reward.required_fields == ("latents", "text")  # prompts, or both embeddings
    assert set(reward.optional_fields) == {"prompts", "prompt_embeds", "pooled_prompt_embeds", "metadata"}
    no_text = DiNaLatentReward(tiny_rm)
    assert no_text.required_fields == ("latents", "prompt_embeds", "pooled_prompt_embeds")
    remote = RemoteLatentReward(client=_FakeClient())
    assert isinstance(remote, LatentReward)
    assert not isinstance(remote, DifferentiableLatentReward)
    assert not hasattr(remote, "score_differentiable")


def test_call_returns_float32_batch_without_grad(reward, latents):
    lat = latents.clone().requires_grad_(True)
    scores = reward(latents=lat, prompts=PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert not scores.requires_grad
    assert torch.isfinite(scores).all()


def test_keyword_only_call(reward, latents):
    with pytest.raises(TypeError):
        reward(latents, PROMPTS)  # type: ignore[misc]


def test_differentiable_scores_reach_latents(reward, latents):
    lat = latents.clone().requires_grad_(True)
    scores = reward.score_differentiable(latents=lat, prompts=PROMPTS)
    scores.sum().backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(scores.detach(), reward(latents=latents, prompts=PROMPTS), atol=1e-6)


def test_prompts_and_embeddings_give_the_same_scores(reward, latents, text, tiny_rm):
    pe, pooled = text
    by_prompts = reward(latents=latents, prompts=PROMPTS)
    by_embeds = reward(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, prompts=PROMPTS)
    assert torch.allclose(by_prompts, by_embeds, atol=1e-6)
    embeds_only = DiNaLatentReward(tiny_rm)(latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled)
    assert embeds_only.shape == (4,)
    with pytest.raises(ValueError, match="prompt_embeds"):
        DiNaLatentReward(tiny_rm)(latents=latents, prompts=PROMPTS)


def test_clear_errors(reward, latents):
    with pytest.raises(ValueError, match="4 latents but 3 prompts"):
        reward(latents=latents, prompts=PROMPTS[:3])
    with pytest.raises(ValueError, match="single string"):
        reward(latents=latents, prompts="a red cube")
    with pytest.raises(ValueError, match="channels"):
        reward(latents=latents[:, :4], prompts=PROMPTS)
    with pytest.raises(ValueError, match="u must lie"):
        DiNaLatentReward(reward.model, u=1.5)
    with pytest.raises(ValueError, match="n_noise"):
        DiNaLatentReward(reward.model, n_noise=0)


# ---------------------------------------------------------------------- seeding
def test_scores_are_reproducible_and_seed_dependent(tiny_rm, tiny_pipe, latents):
    a = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ)
    b = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ)
    other = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ, seeding=NoiseSeeding(base_seed=1))
    s = a(latents=latents, prompts=PROMPTS)
    assert torch.equal(s, b(latents=latents, prompts=PROMPTS))
    assert not torch.allclose(s, other(latents=latents, prompts=PROMPTS))
    a.set_step(3)
    assert not torch.allclose(s, a(latents=latents, prompts=PROMPTS))


def test_explicit_seeds_match_the_model_with_that_noise(reward, tiny_rm, latents, text):
    pe, pooled = text
    seeds = [11, 22, 33, 44]
    raw = reward.score_raw(latents=latents, prompts=PROMPTS, seeds=seeds)
    noise = noise_from_seeds(seeds, (16, 32, 32))
    with torch.no_grad():
        expected = tiny_rm.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4, noise=noise)
    assert torch.allclose(raw, expected, atol=1e-6)
    # metadata seeds are used as is
    meta = [{"seed": s} for s in seeds]
    assert torch.allclose(reward.normalization(raw), reward(latents=latents, prompts=PROMPTS, metadata=meta))


def test_noise_does_not_depend_on_the_batch_split(tiny_rm, tiny_pipe, latents):
    """Rank independence: scoring the batch in two halves (two ranks) gives the same scores."""
    r = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ)  # default: seeds keyed by prompt
    whole = r(latents=latents, prompts=PROMPTS)
    halves = torch.cat(
        [r(latents=latents[:2], prompts=PROMPTS[:2]), r(latents=latents[2:], prompts=PROMPTS[2:])]
    )
    assert torch.allclose(whole, halves, atol=1e-6)
    # "sample" mode with sample ids in the metadata is split-independent too
    s = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ, seeding=NoiseSeeding("sample", 7))
    meta = [{"sample_id": i} for i in range(4)]
    whole = s(latents=latents, prompts=PROMPTS, metadata=meta)
    halves = torch.cat(
        [
            s(latents=latents[:2], prompts=PROMPTS[:2], metadata=meta[:2]),
            s(latents=latents[2:], prompts=PROMPTS[2:], metadata=meta[2:]),
        ]
    )
    assert torch.allclose(whole, halves, atol=1e-6)


def test_prompt_mode_shares_noise_within_a_prompt(tiny_rm, tiny_pipe, latents):
    same = latents[:1].repeat(2, 1, 1, 1)  # one latent twice, same prompt
    shared = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ)
    scores = shared(latents=same, prompts=["a red cube"] * 2)
    assert torch.equal(scores[0], scores[1])
    own = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ, seeding=NoiseSeeding("sample"))
    scores = own(latents=same, prompts=["a red cube"] * 2)
    assert not torch.equal(scores[0], scores[1])


def test_seeding_modes():
    keys = ["a", "b", "a"]
    sample = NoiseSeeding("sample", 0).seeds(keys)
    prompt = NoiseSeeding("prompt", 0).seeds(keys)
    assert sample[0] != sample[2] and prompt[0] == prompt[2] and prompt[0] != prompt[1]
    assert NoiseSeeding("sample", 0).seeds(keys, step=1) != sample
    assert NoiseSeeding().seeds(["a"], [{"seed": 5}]) == [5]
    torch.manual_seed(0)
    r1 = NoiseSeeding("random").seeds(keys)
    torch.manual_seed(0)
    assert NoiseSeeding("random").seeds(keys) == r1
    # the hash is a fixed function (stable across processes, versions and machines)
    assert hash_seed(0, 0, "a red cube", 0) == hash_seed(0, 0, "a red cube", 0) < 2**63
    assert request_seeds(3, 2) == [hash_seed("request", 3, 0), hash_seed("request", 3, 1)]
    with pytest.raises(ValueError, match="mode"):
        NoiseSeeding("rank")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        NoiseSeeding().seeds(["a"], [{"seed": -1}])


def test_noise_from_seeds_is_per_sample():
    n = noise_from_seeds([1, 2], (2, 4, 4))
    assert n.shape == (2, 2, 4, 4)
    assert torch.equal(noise_from_seeds([2], (2, 4, 4))[0], n[1])
    multi = noise_from_seeds([1, 2], (2, 4, 4), n_noise=3)
    assert multi.shape == (3, 2, 2, 4, 4) and torch.equal(multi[0, 0], n[0])


# ---------------------------------------------------------------------- normalisation
def test_normalization_presets_and_errors(tiny_rm, tiny_pipe, latents):
    raw = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ, normalization="raw")(
        latents=latents, prompts=PROMPTS
    )
    disp = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ)(latents=latents, prompts=PROMPTS)
    fork = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ, normalization="fork")(
        latents=latents, prompts=PROMPTS
    )
    custom = DiNaLatentReward(tiny_rm, tiny_pipe, max_sequence_length=SEQ, normalization=(0.0, 5.0))(
        latents=latents, prompts=PROMPTS
    )
    assert torch.allclose(disp, raw / 10 + 1, atol=1e-6)
    assert torch.allclose(fork, disp + 0.2, atol=1e-6)
    assert torch.allclose(custom, raw / 5, atol=1e-6)
    assert resolve_normalization("model", tiny_rm) == ScoreNormalization(10.0, 10.0, "model")
    assert resolve_normalization({"offset": 1, "scale": 2}).scale == 2
    for bad in ("zscore", (1.0, 0.0), (1.0, -1.0), {"offset": 1}, 3):
        with pytest.raises(ValueError):
            resolve_normalization(bad)
    with pytest.raises(ValueError, match="needs a reward model"):
        resolve_normalization("model")


# ---------------------------------------------------------------------- composition
class CountingReward:
    """A latent reward that counts its calls (built from configs by dotted path below)."""

    built = 0

    def __init__(self, value: float = 1.0, name: str = "count") -> None:
        CountingReward.built += 1
        self.value = value
        self.name = name
        self.calls = 0
        self.required_fields = ("latents",)
        self.optional_fields = ("metadata",)

    def __call__(
        self, *, latents, prompt_embeds=None, pooled_prompt_embeds=None, prompts=None, metadata=None
    ):
        self.calls += 1
        return torch.full((latents.shape[0],), self.value)


def test_composite_weights_components_and_avg(reward, latents):
    const = CountingReward(2.0)
    comp = CompositeReward({"dinalrm": (reward, 0.5), "const": (const, 2.0)})
    out = comp(latents=latents, prompts=PROMPTS)
    assert list(out) == ["dinalrm", "const", "avg"]
    assert torch.allclose(out["avg"], 0.5 * out["dinalrm"] + 4.0)
    assert comp.required_fields == ("latents", "text")
    assert not comp.differentiable


def test_same_reward_under_two_names_is_evaluated_once(latents):
    const = CountingReward(3.0)
    comp = CompositeReward([("a", const, 1.0), ("b", const, -1.0)])
    out = comp(latents=latents)
    assert const.calls == 1
    assert torch.allclose(out["avg"], torch.zeros(4))
    assert len(comp.unique_rewards) == 1


def test_build_composite_dedups_identical_configs(latents):
    CountingReward.built = 0
    path = f"{__name__}:CountingReward"
    comp = build_composite(
        [
            {"name": "x", "type": path, "weight": 1.0, "kwargs": {"value": 1.0}},
            {"name": "y", "type": path, "weight": 2.0, "kwargs": {"value": 1.0}},  # same config
            {"name": "z", "type": path, "kwargs": {"value": 5.0}},
        ]
    )
    assert CountingReward.built == 2
    assert comp.components[0][1] is comp.components[1][1]
    out = comp(latents=latents)
    assert torch.allclose(out["avg"], torch.full((4,), 1.0 + 2.0 + 5.0))
    with pytest.raises(ValueError, match="unknown reward type"):
        build_composite([{"name": "q", "type": "no-such-reward"}])
    with pytest.raises(ValueError, match="unknown reward spec keys"):
        build_composite([{"name": "q", "type": path, "weights": 1}])


def test_build_composite_dinalrm_type_from_folder(tmp_path, tiny_rm, tiny_pipe, latents, reward):
    tiny_rm.save_pretrained(tmp_path / "rm")
    comp = build_composite(
        [
            {
                "name": "dinalrm",
                "type": "dinalrm",
                "kwargs": {"model_id_or_path": str(tmp_path / "rm"), "max_sequence_length": SEQ},
            },
            {
                "name": "dinalrm_again",
                "type": "dinalrm",
                "kwargs": {"model_id_or_path": str(tmp_path / "rm"), "max_sequence_length": SEQ},
            },
        ],
        context={"pipeline": tiny_pipe},
    )
    assert len(comp.unique_rewards) == 1 and comp.differentiable
    out = comp(latents=latents, prompts=PROMPTS)
    assert torch.allclose(out["dinalrm"], reward(latents=latents, prompts=PROMPTS), atol=1e-5)


def test_composite_errors(reward, latents):
    with pytest.raises(ValueError, match="reserved"):
        CompositeReward({"avg": (reward, 1.0)})
    with pytest.raises(ValueError, match="duplicate"):
        CompositeReward([("a", reward, 1.0), ("a", reward, 1.0)])
    with pytest.raises(ValueError, match="not a latent reward"):
        CompositeReward({"f": (lambda **kw: 0, 1.0)})
    with pytest.raises(ValueError, match="finite"):
        CompositeReward({"a": (reward, float("nan"))})
    with pytest.raises(ValueError, match="needs \\['text'\\]"):
        CompositeReward({"a": (reward, 1.0)})(latents=latents)
    with pytest.raises(ValueError, match="needs \\['text'\\]"):  # one embedding is not enough
        CompositeReward({"a": (reward, 1.0)})(latents=latents, prompt_embeds=torch.zeros(4, 93, 32))
    comp = CompositeReward({"c": (CountingReward(), 1.0)})
    with pytest.raises(TypeError, match="not differentiable"):
        comp.score_differentiable_details(latents=latents)


def test_differentiable_composite(reward, latents):
    comp = CompositeReward(
        {
            "lo": (reward, 1.0),
            "hi": (DiNaLatentReward(reward.model, reward.pipeline, u=0.7, max_sequence_length=SEQ), 1.0),
        }
    )
    lat = latents.clone().requires_grad_(True)
    out = comp.score_differentiable_details(latents=lat, prompts=PROMPTS)
    out["avg"].sum().backward()
    assert lat.grad.abs().sum() > 0


# ---------------------------------------------------------------------- pixel bridge
def test_pixel_bridge_formats_agree(tiny_pipe, images):
    u8 = (images * 255).round().to(torch.uint8)
    nhwc = u8.permute(0, 2, 3, 1).numpy()
    pils = [Image.fromarray(a) for a in nhwc]
    from_float = images_to_latents(u8.float() / 255, tiny_pipe)
    from_numpy = images_to_latents(nhwc, tiny_pipe)
    from_pil = images_to_latents(pils, tiny_pipe)
    assert from_float.shape == (4, 16, 32, 32)
    assert torch.allclose(from_float, from_numpy, atol=1e-5) and torch.allclose(
        from_numpy, from_pil, atol=1e-5
    )
    # the bridge uses the VAE posterior mean (deterministic), not encode_images' default posterior sample
    mean = torch.stack(encode_images(tiny_pipe, u8.float() / 255, sample_posterior=False))
    assert torch.allclose(from_float, mean)
    assert torch.equal(images_to_latents(nhwc, tiny_pipe), from_numpy)
    with pytest.raises(ValueError, match="same size"):
        images_to_latents([pils[0], pils[1].resize((32, 32))], tiny_pipe)
    with pytest.raises(ValueError, match="VAE"):
        images_to_latents(images, None)


def test_pixel_bridge_scores_and_gradients(reward, tiny_pipe, images):
    bridge = PixelBridge(reward, tiny_pipe)
    scores = bridge(images, prompts=PROMPTS)
    assert torch.allclose(scores, reward(latents=images_to_latents(images, tiny_pipe), prompts=PROMPTS))
    x = images.clone().requires_grad_(True)
    bridge.score_differentiable(x, prompts=PROMPTS).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------- Flow-GRPO / DiffusionNFT
def test_flow_grpo_image_contract(tiny_rm, tiny_pipe, images, reward):
    fn = flow_grpo_reward(tiny_rm, tiny_pipe, max_sequence_length=SEQ)
    details, info = fn(images, PROMPTS, [{} for _ in PROMPTS], only_strict=True)
    assert info == {} and set(details) == {"dinalrm", "avg"}
    for value in details.values():
        assert isinstance(value, np.ndarray) and value.dtype == np.float32 and value.shape == (4,)
    # what the trainer does with it
    as_tensors = {k: torch.as_tensor(v, device="cpu").float() for k, v in details.items()}
    expected = reward(latents=images_to_latents(images, tiny_pipe), prompts=PROMPTS)
    assert torch.allclose(as_tensors["avg"], expected, atol=1e-6)
    scores, extra = fn.as_scorer()(images, PROMPTS, [{}] * 4)
    assert np.array_equal(scores, details["avg"]) and extra == {}


def test_flow_grpo_latent_contract_matches_local(tiny_rm, latents, text, reward):
    pe, pooled = text
    fn = flow_grpo_latent_reward(tiny_rm, normalization="fork", name="diffusion_rm_0.4")
    details, info = fn(latents, pe, pooled, metadata=None)
    assert set(details) == {"diffusion_rm_0.4", "avg"} and info == {}
    assert details["avg"].dtype == np.float32
    same = DiNaLatentReward(tiny_rm, normalization="fork")(
        latents=latents, prompt_embeds=pe, pooled_prompt_embeds=pooled
    )
    assert np.allclose(details["avg"], same.numpy())
    with_text_stack = flow_grpo_latent_reward(
        tiny_rm, reward.pipeline, normalization="fork", max_sequence_length=SEQ
    )
    assert np.allclose(with_text_stack(latents, pe, pooled)[0]["avg"], details["avg"])  # embeddings suffice
    keyed, _ = fn(latents, pe, pooled, prompts=PROMPTS)  # prompts key the seeds like the local reward
    assert np.allclose(keyed["avg"], reward(latents=latents, prompts=PROMPTS).numpy() + 0.2, atol=1e-6)


def test_flow_grpo_composite_logs_each_part(reward, tiny_pipe, images):
    comp = CompositeReward({"dinalrm": (reward, 1.0), "bonus": (CountingReward(1.0), 0.2)})
    details, _ = flow_grpo_reward(comp, tiny_pipe)(images, PROMPTS, [{}] * 4)
    assert set(details) == {"dinalrm", "bonus", "avg"}
    assert np.allclose(details["avg"], details["dinalrm"] + 0.2)


# ---------------------------------------------------------------------- trl DDPO / AlignProp (stand-in)
def _trl_ddpo_compute_rewards(reward_fn, prompt_image_pairs):
    """What trl 0.23's DDPOTrainer.compute_rewards + step do with the reward function's output."""
    rewards = []
    for images, prompts, prompt_metadata in prompt_image_pairs:
        reward, reward_metadata = reward_fn(images, prompts, prompt_metadata)
        rewards.append((torch.as_tensor(reward, device="cpu"), reward_metadata))
    rewards, metadata = zip(*rewards)
    return torch.cat(rewards).cpu().numpy(), metadata


def test_ddpo_adapter_with_sd1_images(tiny_rm, tiny_pipe, reward):
    fn = ddpo_reward_fn(tiny_rm, tiny_pipe, max_sequence_length=SEQ)
    sd1 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # SD1 decode, any size
    pairs = [
        (sd1, ("a red cube", "a red cube"), ({"i": 0}, {"i": 1})),
        (sd1.flip(0), ("a cat", "a dog"), ("x", None)),
    ]
    rewards, metadata = _trl_ddpo_compute_rewards(fn, pairs)
    assert rewards.shape == (4,) and rewards.dtype == np.float32
    assert set(metadata[0]) == {"dinalrm", "avg"}
    expected = reward(latents=images_to_latents(sd1, tiny_pipe), prompts=["a red cube", "a red cube"])
    assert np.allclose(rewards[:2], expected.numpy(), atol=1e-6)


def test_alignprop_adapter_is_differentiable(tiny_rm, tiny_pipe):
    fn = ddpo_reward_fn(tiny_rm, tiny_pipe, differentiable=True, max_sequence_length=SEQ)
    x = torch.rand(2, 3, 32, 32).requires_grad_(True)
    rewards, _ = fn(x, ("a red cube", "a blue ball"), ({}, {}))
    loss = 10.0 - rewards.mean()  # AlignProp's loss
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    remote = RemoteLatentReward(client=_FakeClient())
    with pytest.raises(ValueError, match="remote reward never is"):
        ddpo_reward_fn(remote, tiny_pipe, differentiable=True)


# ---------------------------------------------------------------------- Flow-Factory / UniRL style
def test_pointwise_and_backend_wrappers(tiny_rm, tiny_pipe, latents, images, reward):
    pointwise = PointwiseLatentRewardModel(tiny_rm, tiny_pipe, max_sequence_length=SEQ)
    assert PointwiseLatentRewardModel.required_fields == ("prompt", "latents")
    out = pointwise(PROMPTS, latents=latents)
    assert torch.allclose(out.rewards, reward(latents=latents, prompts=PROMPTS)) and "dinalrm" in out.extra
    assert pointwise(PROMPTS, image=images).rewards.shape == (4,)
    with pytest.raises(ValueError, match="video"):
        pointwise(PROMPTS, video=images)

    backend = LatentRewardBackend(tiny_rm, tiny_pipe, max_sequence_length=SEQ)
    assert backend.is_available() and backend.preferred_input_kind == "latents"
    res = backend.compute_rewards({"latents": latents, "prompts": PROMPTS})
    assert np.allclose(res["rewards"], reward(latents=latents, prompts=PROMPTS).tolist())
    x = images.clone().requires_grad_(True)
    backend.compute_rewards_differentiable(x, PROMPTS).sum().backward()
    assert x.grad.abs().sum() > 0
    backend.offload()
    assert tiny_rm.device.type == "cpu"
    backend.onload()
    with pytest.raises(ValueError, match="unknown request keys"):
        backend.compute_rewards({"latents": latents, "prompt": PROMPTS})
