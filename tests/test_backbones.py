"""The backbone-generic reward model on SD3.5, FLUX.1 and Z-Image (tiny offline models): batch-composition
invariance, gradients, configs, bad input, tiny ids, text encoding, dropped blocks, ``use_text_features``."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dinalrm_align import LatentRewardModel
from dinalrm_align.reward_model.config import RewardModelConfig
from dinalrm_align.reward_model.text import encode_prompts
from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

BACKBONES = ("sd3", "flux", "zimage")
SHORT, LONG = "a red cube", "a small blue ball on a wooden table next to a green tree in the evening light"
SEQ_LEN = 32
#: Context-side (text stream) projections of a dual-stream block.
CONTEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@pytest.fixture(scope="module")
def family():
    """backbone -> (pipe, rm, scheduler_config). Shared: tests that modify a model build their own."""
    out = {}
    for name in BACKBONES:
        pipe = tiny_pipeline(name, seed=0)
        out[name] = (pipe, tiny_reward_model(name, pipe, seed=0), dict(pipe.scheduler.config))
    return out


def _latents(b, seed, side=16):
    return torch.randn(b, 16, side, side, generator=torch.Generator().manual_seed(seed))


def _text(pipe, prompts, length=SEQ_LEN):
    return encode_prompts(pipe, prompts, length)


def _rows(pe, pooled, idx):
    """Select samples of the family's native text outputs (a list for Z-Image)."""
    sel = [pe[i] for i in idx] if isinstance(pe, list) else pe[idx]
    return sel, (None if pooled is None else pooled[idx])


class ComputeSpy:
    """Counts forwards of a module tree's blocks (to prove that an error came before any compute)."""

    def __init__(self, module):
        self.calls = 0
        self.handles = [
            m.register_forward_pre_hook(self._hook)
            for m in module.modules()
            if isinstance(m, torch.nn.Linear)
        ]

    def _hook(self, module, args):
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------- batch composition
@pytest.mark.parametrize("backbone", BACKBONES)
@torch.no_grad()
def test_score_of_a_sample_does_not_depend_on_its_batch(family, backbone):
    pipe, rm, _ = family[backbone]
    pe, pooled = _text(pipe, [SHORT, LONG, SHORT])
    if backbone == "zimage":  # the critical case: captions of different lengths, padded and masked
        assert pe[0].shape[0] < pe[1].shape[0]
    lat, noise = _latents(3, 0), _latents(3, 1)
    lat[2] = lat[0] * 0.5  # same prompt as sample 0, other latent

    pe_a, pooled_a = _rows(pe, pooled, [0])
    alone = rm.score(lat[:1], prompt_embeds=pe_a, pooled_prompt_embeds=pooled_a, noise=noise[:1])
    pe_b, pooled_b = _rows(pe, pooled, [0, 1])
    together = rm.score(lat[:2], prompt_embeds=pe_b, pooled_prompt_embeds=pooled_b, noise=noise[:2])
    pe_r, pooled_r = _rows(pe, pooled, [1, 0])
    reordered = rm.score(lat[[1, 0]], prompt_embeds=pe_r, pooled_prompt_embeds=pooled_r, noise=noise[[1, 0]])
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered[1], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered[0], together[1], atol=1e-5, rtol=0)
    # the other sample matters for itself: another latent, another score
    full = rm.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    torch.testing.assert_close(full[0], alone[0], atol=1e-5, rtol=0)
    assert abs(float(full[2] - full[0])) > 1e-4

    # the ensemble too (one batched pass over the levels)
    kw = dict(us=(0.2, 0.5, 0.7))
    one = dict(prompt_embeds=pe_a, pooled_prompt_embeds=pooled_a)
    ens_alone = rm.score_ensemble(lat[:1], noise=noise[:1], **one, **kw)
    ens_together = rm.score_ensemble(
        lat[:2], prompt_embeds=pe_b, pooled_prompt_embeds=pooled_b, noise=noise[:2], **kw
    )
    torch.testing.assert_close(ens_together[0], ens_alone[0], atol=1e-5, rtol=0)
    # and n_noise averaging (the draws are tiled into the batch)
    draws = torch.randn(2, 2, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    multi = rm.score(lat[:2], prompt_embeds=pe_b, pooled_prompt_embeds=pooled_b, noise=draws, n_noise=2)
    single = rm.score(lat[:1], noise=draws[:, :1], n_noise=2, **one)
    torch.testing.assert_close(multi[0], single[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_zimage_padding_tokens_never_reach_the_score(family):
    """A padded Z-Image conditioning scores as the unpadded list, whatever the padding holds."""
    from dinalrm_align.backbones.conditioning import TextConditioning

    pipe, rm, _ = family["zimage"]
    pe, _ = _text(pipe, [SHORT, LONG])
    cond = TextConditioning.from_list(pe)
    assert cond.mask is not None and not bool(cond.mask[0].all())
    garbage = cond.embeds.clone()
    garbage[~cond.mask] = 7.0
    lat, noise = _latents(2, 2), _latents(2, 3)
    ref = rm.score(lat, prompt_embeds=pe, noise=noise)
    torch.testing.assert_close(
        rm.score(lat, prompt_embeds=TextConditioning(garbage, None, cond.mask), noise=noise),
        ref,
        atol=1e-5,
        rtol=0,
    )


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradients_reach_latents_lora_and_head(family, backbone):
    pipe, _, scheduler_config = family[backbone]
    rm = tiny_reward_model(backbone, pipe, seed=1)
    pe, pooled = _text(pipe, [SHORT, LONG], 8)
    lat = _latents(2, 4).requires_grad_(True)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, generator=torch.Generator().manual_seed(0))
    rm.score(lat, **kw).sum().backward()
    assert lat.grad is not None and float(lat.grad.abs().sum()) > 0
    assert all(p.grad is None for p in rm.parameters())  # frozen by default
    params = rm.set_trainable(lora=True, head=True)
    names = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n or n.startswith("reward_head.") for n in names)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    rm.score(lat.detach(), **kw).sum().backward()
    for n, p in rm.named_parameters():
        if "lora_" in n:  # every reward-LoRA matrix influences the score
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
        elif n.startswith("reward_head."):
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert float(rm.reward_head.query_tokens.grad.abs().sum()) > 0
    assert float(rm.reward_head.head.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_round_trips_through_save_pretrained(tmp_path, family, backbone):
    pipe, rm, scheduler_config = family[backbone]
    folder = rm.save_pretrained(tmp_path / "rm")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model"]["backbone"] == backbone
    loaded = LatentRewardModel.from_pretrained(
        folder, transformer=pipe.transformer, scheduler_config=scheduler_config
    )
    assert loaded.config.backbone == backbone and loaded.adapter.name == backbone
    pe, pooled = _text(pipe, [SHORT, LONG], 8)
    lat, noise = _latents(2, 5), _latents(2, 6)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(lat, **kw), rm.score(lat, **kw), atol=0, rtol=0)
    # the sigma table travels with the model: a reload without the pipeline's scheduler scores the same
    assert saved["dinalrm_align"]["scheduler"]["shift"] == scheduler_config["shift"]
    bare = LatentRewardModel.from_pretrained(folder, transformer=pipe.transformer)
    torch.testing.assert_close(bare.sigma_for(0.4), rm.sigma_for(0.4), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(bare.score(lat, **kw), rm.score(lat, **kw), atol=0, rtol=0)


def test_family_scheduler_is_the_default_sigma_table(family):
    """Without a scheduler config a fresh model uses its family's: FLUX.1's dynamic-shift table is unshifted."""
    pipe, _, _ = family["flux"]
    config = RewardModelConfig.from_dict(family["flux"][1].config.to_dict())
    config.scheduler = None
    fresh = LatentRewardModel(config, pipe.transformer)
    assert abs(float(fresh.sigma_for(0.4)[0]) - 0.4) < 1e-6 and fresh.scheduler_config["use_dynamic_shifting"]
    sd3_pipe, sd3_rm, _ = family["sd3"]
    sd3_config = RewardModelConfig.from_dict(sd3_rm.config.to_dict())
    sd3_config.scheduler = None
    sd3_fresh = LatentRewardModel(sd3_config, sd3_pipe.transformer)
    assert sd3_fresh.scheduler_config["shift"] == 3.0
    assert abs(float(sd3_fresh.sigma_for(0.4)[0]) - 0.4) > 1e-4  # the shifted table has no entry at 0.4


def test_sd3_config_without_backbone_loads_as_sd3(tmp_path, family):
    pipe, rm, _ = family["sd3"]
    folder = rm.save_pretrained(tmp_path / "rm")
    config = json.loads((folder / "config.json").read_text())
    del config["model"]["backbone"]
    config["model"]["backbone_model_id"] = "stabilityai/stable-diffusion-3.5-medium"  # as released
    (folder / "config.json").write_text(json.dumps(config))
    loaded = LatentRewardModel.from_pretrained(folder, transformer=pipe.transformer)
    assert loaded.config.backbone == "sd3"
    pe, pooled = _text(pipe, [SHORT, LONG], 8)
    lat, noise = _latents(2, 7), _latents(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise),
            rm.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise),
        )
    assert RewardModelConfig.from_dict({k: v for k, v in config["model"].items()}).backbone == "sd3"


def _summary(cfg):
    lora, head = cfg.lora_config, cfg.reward_head
    return (cfg.backbone, cfg.num_transformer_layers, cfg.visual_head_idx, cfg.text_head_idx,
            (lora.r, lora.lora_alpha), (head.width, head.use_proj_in))  # fmt: skip


def test_for_backbone_gives_the_upstream_defaults():
    sd3, flux, zimage = (RewardModelConfig.for_backbone(name) for name in BACKBONES)
    assert _summary(sd3) == ("sd3", 12, [4, 8, 12], [4, 8, 12], (64, 128), (-1, False))
    assert _summary(flux) == ("flux", 19, [8, 12, 16, 19], [8, 12, 16, 19], (64, 128), (1536, True))
    assert _summary(zimage)[:5] == ("zimage", 16, [4, 8, 12, 16], [4, 8, 12, 16], (32, 64))
    assert flux.backbone_model_id == "black-forest-labs/FLUX.1-dev"
    assert zimage.backbone_model_id == "Tongyi-MAI/Z-Image-Turbo"
    # overrides update the model section; aliases resolve
    small = RewardModelConfig.for_backbone("z-image", num_transformer_layers=8, visual_head_idx=[4, 8],
                                           text_head_idx=[8])  # fmt: skip
    assert _summary(small)[:4] == ("zimage", 8, [4, 8], [8])
    # the defaults survive a dict round trip
    assert RewardModelConfig.from_dict(flux.to_dict()).model_section() == flux.model_section()


def test_full_size_flux_reward_model_builds_on_the_meta_device():
    """FLUX.1-dev's architecture, upstream config: all 19 double-stream blocks, no single-stream block."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    rm = LatentRewardModel.from_config(
        RewardModelConfig.for_backbone("flux"), transformer=transformer, device="meta"
    )
    assert len(rm.backbone.transformer_blocks) == 19 and len(rm.backbone.single_transformer_blocks) == 0
    assert not any(n.startswith("single_transformer_blocks") for n, _ in rm.backbone.named_parameters())
    assert rm.reward_head.width == 1536
    assert rm.reward_head.layer_adapters_visual[0].proj_in.in_features == 3072
    lora = {n for n, _ in rm.backbone.named_parameters() if "lora_A" in n}
    assert len(lora) == 19 * 8  # the 8 joint-attention projections of every kept block (text tapped at 19)
    assert rm.embedded_guidance == 3.5


# ---------------------------------------------------------------------------------------- bad input
def _expect_error(rm, fn, match):
    spy = ComputeSpy(rm)
    try:
        with pytest.raises(ValueError, match=match):
            fn()
    finally:
        spy.remove()
    assert spy.calls == 0, f"{spy.calls} layer calls ran before the error"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_bad_input_is_a_clear_error_before_any_compute(family, backbone):
    pipe, rm, _ = family[backbone]
    pe, pooled = _text(pipe, [SHORT, LONG], 8)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
    lat = _latents(2, 9)
    _expect_error(
        rm, lambda: rm.score(_latents(2, 0)[:, :4], **kw), rf"must have 16 channels for the {backbone}"
    )
    _expect_error(
        rm, lambda: rm.score(lat[..., :15], **kw), rf"multiples of 2 for the {backbone} backbone, got 16x15"
    )
    packed = lat.reshape(2, 16, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 64, 64)  # FLUX's packed form
    _expect_error(rm, lambda: rm.score(packed, **kw), r"4-D \(B, C, h, w\).*packed.*unpack them first")
    _expect_error(rm, lambda: rm.features(packed, pe, pooled, sigma=0.5), r"4-D \(B, C, h, w\)")
    _expect_error(rm, lambda: rm.score(lat * 1e30, **kw), "latents holds values up to .* at most 10000")
    _expect_error(rm, lambda: rm.score_ensemble(lat * 1e30, **kw), "latents holds values up to")
    huge_pe = [t * 1e30 for t in pe] if isinstance(pe, list) else pe * 1e30
    _expect_error(
        rm, lambda: rm.score(lat, prompt_embeds=huge_pe, pooled_prompt_embeds=pooled), "prompt_embeds holds"
    )
    wide = torch.randn(2, 8, 48)  # e.g. another family's encoder width (Z-Image 2560 vs T5 4096)
    _expect_error(
        rm,
        lambda: rm.score(lat, prompt_embeds=wide, pooled_prompt_embeds=pooled),
        rf"prompt_embeds width 48 does not fit the {backbone} transformer \(expects 32\)",
    )
    _expect_error(
        rm,
        lambda: rm.score(
            lat, prompt_embeds=pe[:1], pooled_prompt_embeds=None if pooled is None else pooled[:1]
        ),
        "batch sizes disagree",
    )
    if backbone == "zimage":
        _expect_error(
            rm,
            lambda: rm.score(lat, prompt_embeds=pe, pooled_prompt_embeds=torch.randn(2, 32)),
            "Z-Image has no pooled text vector",
        )
        # larger than the RoPE tables (1024 latent rows / columns, 992 caption tokens for the tiny model)
        _expect_error(
            rm,
            lambda: rm.score(torch.randn(1, 16, 1026, 2), prompt_embeds=pe[:1]),
            "1026x2 exceed the zimage transformer's position grid: at most 1024x1024",
        )
        _expect_error(
            rm,
            lambda: rm.score(_latents(1, 0, 2), prompt_embeds=[torch.randn(993, 32)]),
            "caption of 993 tokens exceeds the transformer's position grid: at most 992",
        )
        with torch.no_grad():  # the limits themselves are accepted
            assert torch.isfinite(rm.score(_latents(1, 0, 2), prompt_embeds=[torch.randn(992, 32)])).all()
    else:
        _expect_error(rm, lambda: rm.score(lat, prompt_embeds=pe), "needs pooled_prompt_embeds")
        other = "flux" if backbone == "sd3" else "sd3"  # real pooled vectors of the other family's text stack
        pe_o, pooled_o = _text(family[other][0], [SHORT, LONG], 8)
        _expect_error(
            rm,
            lambda: rm.score(lat, prompt_embeds=pe_o, pooled_prompt_embeds=pooled_o),
            rf"pooled_prompt_embeds width {pooled_o.shape[-1]} does not fit the {backbone} transformer",
        )
        pe_z, _ = _text(family["zimage"][0], [SHORT, LONG], 8)  # Z-Image's list of variable-length tensors
        _expect_error(rm, lambda: rm.score(lat, prompt_embeds=pe_z, pooled_prompt_embeds=pooled), "must be a")
    if backbone == "sd3":
        _expect_error(rm, lambda: rm.score(_latents(2, 0, 80), **kw), "position grid: at most 64x64")


def test_checkpoint_of_another_backbone_and_unknown_names_are_refused(tmp_path, family):
    flux_pipe, flux_rm, _ = family["flux"]
    sd3_pipe = family["sd3"][0]
    folder = flux_rm.save_pretrained(tmp_path / "flux_rm")
    with pytest.raises(
        ValueError, match=r"backbone is 'flux' \(FluxTransformer2DModel\).*SD3Transformer2DModel"
    ):
        LatentRewardModel.from_pretrained(folder, transformer=sd3_pipe.transformer)
    with pytest.raises(ValueError, match="needs a FluxTransformer2DModel, got a SD3Transformer2DModel"):
        LatentRewardModel.from_pretrained("tiny-flux", transformer=sd3_pipe.transformer)
    with pytest.raises(ValueError, match="unknown backbone 'sdxl'; valid backbones: sd3, flux, zimage"):
        RewardModelConfig.for_backbone("sdxl")
    config = json.loads((folder / "config.json").read_text())
    config["model"]["backbone"] = "sdxl"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown backbone 'sdxl'; valid backbones"):
        LatentRewardModel.from_pretrained(folder, transformer=flux_pipe.transformer)
    with pytest.raises(ValueError, match="unknown tiny model 'tiny-sdxl'"):
        LatentRewardModel.from_pretrained("tiny-sdxl")


# ---------------------------------------------------------------------------------------- tiny ids, text
@torch.no_grad()
def test_tiny_ids_load_offline(monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a tiny id must not touch the hub")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, no_hub)
    for spec, backbone, seed in (
        ("tiny", "sd3", 0),
        ("tiny-flux", "flux", 0),
        ("tiny-zimage:3", "zimage", 3),
    ):
        rm = LatentRewardModel.from_pretrained(spec)
        assert rm.config.backbone == backbone
        pipe = tiny_pipeline(backbone, seed=seed)
        pe, pooled = _text(pipe, [SHORT, LONG], 8)
        out = rm.score(
            _latents(2, 10),
            prompt_embeds=pe,
            pooled_prompt_embeds=pooled,
            generator=torch.Generator().manual_seed(0),
        )
        assert out.shape == (2,) and bool(torch.isfinite(out).all())
    # the seed is part of the id: same seed -> same weights, another seed -> other weights
    a = LatentRewardModel.from_pretrained("tiny-zimage:3").state_dict()
    b = tiny_reward_model("zimage", seed=3).state_dict()
    c = LatentRewardModel.from_pretrained("tiny-zimage").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@torch.no_grad()
def test_encode_prompts_returns_what_the_pipeline_returns(family):
    prompts = [SHORT, LONG]
    sd3, flux, zimage = (family[n][0] for n in BACKBONES)
    pe, pooled = encode_prompts(sd3, prompts, 16)
    ref_pe, _, ref_pooled, _ = sd3.encode_prompt(
        prompts, None, None, max_sequence_length=16, do_classifier_free_guidance=False
    )
    torch.testing.assert_close(pe, ref_pe, atol=0, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=0, rtol=0)
    assert pe.shape == (2, 77 + 16, 32)

    pe, pooled = encode_prompts(flux, prompts, 16)
    ref_pe, ref_pooled, _ = flux.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=16)
    torch.testing.assert_close(pe, ref_pe, atol=0, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=0, rtol=0)
    assert pe.shape == (2, 16, 32) and pooled.shape == (2, 32)

    pe, pooled = encode_prompts(zimage, prompts, 64)
    ref, _ = zimage.encode_prompt(
        prompt=list(prompts), do_classifier_free_guidance=False, max_sequence_length=64
    )
    assert pooled is None and isinstance(pe, list) and len(pe) == 2
    assert pe[0].shape[0] < pe[1].shape[0]  # variable lengths, no padding
    for ours, theirs in zip(pe, ref):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert prompts == [SHORT, LONG]  # the pipeline's in-place rewrite of a prompt list does not leak out
    short, _ = encode_prompts(zimage, prompts, 8)
    assert [t.shape[0] for t in short] == [min(8, t.shape[0]) for t in ref]


# ---------------------------------------------------------------------------------------- dropped blocks
@pytest.mark.parametrize("backbone", BACKBONES)
def test_reward_model_holds_only_its_blocks_and_leaves_the_pipeline_intact(backbone):
    pipe = tiny_pipeline(backbone, seed=2)
    transformer = pipe.transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    tap_list = {"sd3": "transformer_blocks", "flux": "transformer_blocks", "zimage": "layers"}[backbone]
    n_blocks = len(getattr(transformer, tap_list))
    for shared in (False, True):
        rm = tiny_reward_model(backbone, pipe, seed=2, share_base_weights=shared)
        kept = rm.config.num_transformer_layers
        assert len(getattr(rm.backbone, tap_list)) == kept
        assert kept < n_blocks or backbone == "flux"  # FLUX keeps every double-stream block (as upstream)
        names = [n for n, _ in rm.backbone.named_parameters()]
        assert not any(n.startswith(f"{tap_list}.{kept}.") for n in names)
        if backbone == "flux":
            assert len(transformer.single_transformer_blocks) == 2
            assert len(rm.backbone.single_transformer_blocks) == 0
            assert not any(n.startswith("single_transformer_blocks") for n in names)
        # the pipeline's blocks never run when scoring (the reward model computes its own copies)
        spy = ComputeSpy(transformer)
        pe, pooled = _text(pipe, [SHORT, LONG], 8)
        lat = _latents(2, 11)
        try:
            rm.set_trainable(lora=True, head=True)
            optim = torch.optim.AdamW(rm.trainable_parameters(), lr=1e-2, weight_decay=0.1)
            lora_before = {n: p.detach().clone() for n, p in rm.named_parameters() if "lora_B" in n}
            for step in range(2):
                kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
                loss = rm.score(lat, generator=torch.Generator().manual_seed(step), **kw).pow(2).mean()
                optim.zero_grad()
                loss.backward()
                optim.step()
        finally:
            spy.remove()
        assert spy.calls == 0
        assert any(not torch.equal(p, lora_before[n]) for n, p in rm.named_parameters() if "lora_B" in n)
        after = transformer.state_dict()
        assert set(after) == set(before) and len(getattr(transformer, tap_list)) == n_blocks
        moved = [k for k in before if not torch.equal(after[k], before[k])]
        assert not moved, f"shared={shared}: pipeline weights moved: {moved[:3]}"
        assert not any("lora" in k for k in after)


# ---------------------------------------------------------------------------------------- use_text_features
@pytest.mark.parametrize("backbone", BACKBONES)
@torch.no_grad()
def test_use_text_features_false_only_changes_the_lora_exclusion(family, backbone):
    pipe, _, _ = family[backbone]
    with_text = tiny_reward_model(backbone, pipe, seed=4)
    without = tiny_reward_model(backbone, pipe, seed=4, use_text_features=False)
    n = without.config.num_transformer_layers
    assert without.config.text_head_idx[-1] == n  # the last block's text IS tapped
    # the head still reads the text taps (as upstream)
    assert len(without.reward_head.layer_adapters_text) == len(without.config.text_head_idx) > 0
    pe, pooled = _text(pipe, [SHORT, LONG], 8)
    lat, noise = _latents(2, 12), _latents(2, 13)
    feats = without.features(lat, pe, pooled, sigma=0.5, noise=noise)
    assert len(feats.text) == len(without.config.text_head_idx)
    swapped_pe, swapped_pooled = _rows(pe, pooled, [1, 0])
    a = without.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    b = without.score(lat, prompt_embeds=swapped_pe, pooled_prompt_embeds=swapped_pooled, noise=noise)
    assert not torch.allclose(a, b, atol=1e-5)  # the text still changes the score
    # the only difference: no LoRA on the last kept block's context-side projections (dual-stream families)
    lora_with = {k for k in with_text.state_dict() if "lora_" in k}
    lora_without = {k for k in without.state_dict() if "lora_" in k}
    extra = lora_with - lora_without
    assert lora_without <= lora_with
    if backbone == "zimage":  # single-stream: nothing to exclude
        assert not extra
    else:
        assert extra and all(k.startswith(f"backbone.transformer_blocks.{n - 1}.attn.") for k in extra)
        hit = {p for p in CONTEXT_PROJECTIONS if any(f".{p}." in k for k in extra)}
        assert hit == set(CONTEXT_PROJECTIONS)
    # same weights elsewhere and that LoRA at zero -> the same scores: nothing else changed
    loaded = with_text.load_state_dict(copy.deepcopy(without.state_dict()), strict=False)
    # only the (LoRA-wrapped vs plain) last-block context projections differ in layout
    assert extra <= set(loaded.missing_keys)
    differing = set(loaded.missing_keys) | set(loaded.unexpected_keys)
    prefix = f"backbone.transformer_blocks.{n - 1}.attn."
    assert all(k.startswith(prefix) and any(f".{p}." in k for p in CONTEXT_PROJECTIONS) for k in differing)
    assert not differing or backbone != "zimage"
    for name, p in with_text.named_parameters():
        if name in extra and "lora_B" in name:
            p.zero_()
    torch.testing.assert_close(
        with_text.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise), a, atol=1e-6, rtol=0
    )
