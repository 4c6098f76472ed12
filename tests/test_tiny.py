"""The tiny offline pipelines of ``dinalrm_align.tiny`` (SD3, FLUX, Z-Image) and the tiny model ids."""

from __future__ import annotations

import pytest
import torch

from dinalrm_align.tiny import TINY_WORDS, parse_tiny_id, tiny_pipeline

BACKBONES = ("sd3", "flux", "zimage")
PIPELINE_CLASS = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "zimage": "ZImagePipeline"}
#: Shape of ``output_type="latent"`` for a batch of 2 at 64x64 (FLUX packs 2x2 patches of 16 channels).
LATENT_SHAPE = {"sd3": (2, 16, 32, 32), "flux": (2, 256, 64), "zimage": (2, 16, 32, 32)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (and do not fight other jobs for the 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_same_output(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Weights are compared exactly, outputs to 1e-6: the SD3 sincos position table (computed with
    CPU sin/cos, like the FLUX/Z-Image RoPE tables) was seen to differ by 1 ulp (3e-8) between two
    builds in one process while the machine was under heavy load."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


@pytest.fixture(scope="module")
def pipes():
    return {b: tiny_pipeline(b, seed=0) for b in BACKBONES}


def _generate(pipe, n_steps: int = 2, output_type: str = "latent", **kwargs):
    prompts = ["a red cube", "a painting of a blue bird"]  # a fresh list: ZImagePipeline edits it in place
    return pipe(
        prompt=prompts,
        num_inference_steps=n_steps,
        height=64,
        width=64,
        output_type=output_type,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def _call_kwargs(backbone: str) -> list[dict]:
    if backbone == "flux":
        return [{"guidance_scale": 3.5}]
    if backbone == "zimage":
        return [{"guidance_scale": 0.0}, {"guidance_scale": 4.0}]
    return [{}]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pipeline_is_frozen_fp32_cpu_and_tiny(pipes, backbone):
    pipe = pipes[backbone]
    assert type(pipe).__name__ == PIPELINE_CLASS[backbone]
    modules = list(_modules(pipe).values())
    assert len(modules) >= 3
    for module in modules:
        n_params = sum(p.numel() for p in module.parameters())
        assert 0 < n_params < 1_000_000
        assert not module.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters())
        assert all(p.device.type == "cpu" for p in module.parameters())
    assert pipe._progress_bar_config.get("disable") is True


@pytest.mark.parametrize("backbone", BACKBONES)
def test_generation_latent_and_pil(pipes, backbone):
    pipe = pipes[backbone]
    for kwargs in _call_kwargs(backbone):
        latents = _generate(pipe, **kwargs)
        assert tuple(latents.shape) == LATENT_SHAPE[backbone]
        assert torch.isfinite(latents).all()
        assert not torch.allclose(latents[0], latents[1])  # different prompts and noise
        images = _generate(pipe, output_type="pil", **kwargs)
        assert len(images) == 2 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)


def test_zimage_guidance_changes_the_result(pipes):
    no_cfg = _generate(pipes["zimage"], guidance_scale=0.0)
    cfg = _generate(pipes["zimage"], guidance_scale=4.0)
    assert not torch.allclose(no_cfg, cfg)


def test_flux_guidance_embeds_flag(pipes):
    assert pipes["flux"].transformer.config.guidance_embeds is True
    schnell = tiny_pipeline("flux", seed=0, guidance_embeds=False)
    assert schnell.transformer.config.guidance_embeds is False
    assert not hasattr(schnell.transformer.time_text_embed, "guidance_embedder")
    latents = _generate(schnell, guidance_scale=0.0)
    assert tuple(latents.shape) == LATENT_SHAPE["flux"]
    # the dev-like model reads the guidance value, so it changes the output
    dev = pipes["flux"]
    assert not torch.allclose(_generate(dev, guidance_scale=1.0), _generate(dev, guidance_scale=5.0))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_same_seed_same_pipeline_different_seed_different_weights(pipes, backbone):
    again = tiny_pipeline(backbone, seed=0)
    other = tiny_pipeline(backbone, seed=1)
    base = pipes[backbone]
    for name, module in _modules(base).items():
        params = dict(module.named_parameters())
        params_again = dict(getattr(again, name).named_parameters())
        params_other = dict(getattr(other, name).named_parameters())
        assert params.keys() == params_again.keys() == params_other.keys()
        assert all(torch.equal(params[k], params_again[k]) for k in params), name
        assert any(not torch.equal(params[k], params_other[k]) for k in params), name
    _assert_same_output(_generate(again), _generate(base))
    assert not torch.allclose(_generate(base), _generate(other))


def test_building_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    tiny_pipeline("zimage", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_and_reload_offline_reproduces_outputs(pipes, backbone, tmp_path):
    import diffusers

    pipe = pipes[backbone]
    kwargs = _call_kwargs(backbone)[-1]
    expected = _generate(pipe, **kwargs)
    pipe.save_pretrained(tmp_path)
    cls = getattr(diffusers, PIPELINE_CLASS[backbone])
    loaded = cls.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.tokenizer) is type(pipe.tokenizer)
    for name, module in _modules(pipe).items():
        loaded_module = getattr(loaded, name)
        assert type(loaded_module) is type(module) and not loaded_module.training
        state, loaded_state = module.state_dict(), loaded_module.state_dict()
        assert state.keys() == loaded_state.keys(), name
        assert all(torch.equal(state[k], loaded_state[k]) for k in state), name
    _assert_same_output(_generate(loaded, **kwargs), expected)
    if backbone == "zimage":
        assert loaded.tokenizer.chat_template == pipe.tokenizer.chat_template


def test_encode_prompt_sd3(pipes):
    out = pipes["sd3"].encode_prompt(
        prompt=["a red cube", "a blue ball"], prompt_2=None, prompt_3=None, max_sequence_length=16
    )
    assert len(out) == 4
    pe, npe, pooled, npooled = out
    assert tuple(pe.shape) == tuple(npe.shape) == (2, 77 + 16, 32)
    assert tuple(pooled.shape) == tuple(npooled.shape) == (2, 64)


def test_encode_prompt_flux(pipes):
    pe, pooled, text_ids = pipes["flux"].encode_prompt(
        prompt=["a red cube", "a blue ball"], max_sequence_length=16
    )
    assert tuple(pe.shape) == (2, 16, 32)
    assert tuple(pooled.shape) == (2, 32)
    assert tuple(text_ids.shape) == (16, 3)
    assert not torch.allclose(pooled[0], pooled[1])


def test_encode_prompt_zimage_variable_lengths(pipes):
    pipe = pipes["zimage"]
    prompts = ["a cat", "a photo of a green tree and a yellow bird"]
    embeds, negatives = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=True)
    assert isinstance(embeds, list) and len(embeds) == 2 and len(negatives) == 2
    lengths = []
    for text, emb in zip(prompts, embeds):
        templated = pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        lengths.append(len(pipe.tokenizer(templated).input_ids))
        assert tuple(emb.shape) == (lengths[-1], 32)
    assert lengths[0] < lengths[1]
    assert negatives[0].shape == negatives[1].shape and negatives[0].shape[0] < lengths[0]
    embeds_no_cfg, negatives_no_cfg = pipe.encode_prompt(
        prompt=list(prompts), do_classifier_free_guidance=False
    )
    assert negatives_no_cfg == [] and all(torch.equal(a, b) for a, b in zip(embeds, embeds_no_cfg))


def test_tokenizers_know_the_colour_words_as_whole_tokens(pipes):
    flux, zimage = pipes["flux"], pipes["zimage"]
    for word in TINY_WORDS:
        assert len(flux.tokenizer.tokenize(word)) == 1, word
        assert len(flux.tokenizer_2.tokenize(word)) == 1, word
        assert len(zimage.tokenizer.tokenize(" " + word)) == 1, word
        assert len(zimage.tokenizer.tokenize(word)) == 1, word
    # Byte-level BPE: any text round-trips, unknown words fall back to bytes.
    text = "a zebra, 42 naïve cats!"
    tok = zimage.tokenizer
    assert tok.decode(tok(text).input_ids) == text


def test_zimage_chat_template_options(pipes):
    tok = pipes["zimage"].tokenizer
    messages = [{"role": "user", "content": "a red cube"}]
    plain = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    thinking = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    no_think = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert plain == "<|im_start|>user\na red cube<|im_end|>\n"
    assert thinking == plain + "<|im_start|>assistant\n"
    assert no_think == thinking + "<think>\n\n</think>\n\n"
    ids = tok(no_think).input_ids
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tok.convert_tokens_to_ids(special) in ids
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "right"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tiny", ("sd3", 0)),
        ("tiny:3", ("sd3", 3)),
        ("tiny-flux", ("flux", 0)),
        ("tiny-flux:3", ("flux", 3)),
        ("tiny-zimage", ("zimage", 0)),
        ("tiny-zimage:12", ("zimage", 12)),
        ("stabilityai/stable-diffusion-3.5-medium", None),
        ("/models/sd3", None),
        ("tiny-models/sd3", None),
        ("", None),
    ],
)
def test_parse_tiny_id(spec, expected):
    assert parse_tiny_id(spec) == expected


@pytest.mark.parametrize(
    "spec", ["tiny-foo", "tinyflux", "tiny-flux:x", "tiny:", "tiny:-1", "tiny:1.5", "tiny-zimage:3:4"]
)
def test_parse_tiny_id_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="tiny"):
        parse_tiny_id(spec)


def test_tiny_pipeline_rejects_unknown_backbone():
    with pytest.raises(ValueError, match="unknown tiny backbone 'sdxl'"):
        tiny_pipeline("sdxl")
