"""The latent reward model: parity with an independent reference, checkpoints, API behaviour."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference_impl import (
    UPSTREAM_LORA_TARGETS,
    PlainBackbone,
    backbone_features,
    head_readout,
    head_tokens,
    sd35_sigma_table,
)

from dinalrm_align import LatentRewardModel, encode_prompts
from dinalrm_align.reward_model.noise import nearest_sigma, sigma_table
from dinalrm_align.tiny import tiny_reward_model, tiny_reward_model_config, tiny_sd3_pipeline

HEADS = 4  # tiny head: width 32, 4 heads


def _latents(b=2, seed=0, h=32):
    return torch.randn(b, 16, h, h, generator=torch.Generator().manual_seed(seed))


def _write_released_layout(root, transformer, seed=0, num_layers=4, vis=(2, 4), txt=(2, 4), r=4, alpha=8):
    """Write a checkpoint exactly as the upstream code saves it (PEFT folder + torch.save head + config)."""
    torch.manual_seed(seed)
    tr = copy.deepcopy(transformer)
    plain = PlainBackbone(tr, num_layers)
    peft_model = get_peft_model(
        plain,
        LoraConfig(
            r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(UPSTREAM_LORA_TARGETS)
        ),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ckpt = root / "checkpoint"
    peft_model.save_pretrained(str(ckpt / "backbone_lora"))
    # Head state dict with the released key names, random values (from a fresh head's shapes).
    cfg = tiny_reward_model_config(
        num_transformer_layers=num_layers, visual_head_idx=list(vis), text_head_idx=list(txt)
    )
    cfg["model"]["lora_config"] = {"r": r, "lora_alpha": alpha, "init_lora_weights": "gaussian"}
    shapes_model = LatentRewardModel.from_config(cfg, transformer=tr)
    head_sd = {k: torch.randn_like(v) * 0.1 for k, v in shapes_model.reward_head.state_dict().items()}
    for k in head_sd:
        if (
            k.endswith("norm_q.weight")
            or k.endswith("norm_v.weight")
            or k.endswith("norm_t.weight")
            or k == "norm_ff.weight"
        ):
            head_sd[k] = 1 + 0.1 * torch.randn_like(head_sd[k])
    torch.save(head_sd, ckpt / "rm_head.pt")
    cfg["data"] = {"train": {"base_batch_size": 4}}
    cfg["training"]["learning_rate"] = 5e-5
    (root / "config.json").write_text(json.dumps(cfg))
    return peft_model, head_sd, cfg


def _reference_score(peft_model, head_sd, latents, pe, pooled, noise, u, vis=(2, 4), txt=(2, 4)):
    sig = sd35_sigma_table()
    idx = torch.argmin((sig[None] - torch.full((latents.shape[0],), u)[:, None]).abs(), 1)
    sigma = sig[idx]
    noisy = (1 - sigma[:, None, None, None]) * latents + sigma[:, None, None, None] * noise
    bb = peft_model.base_model.model
    temb, vf, tf = backbone_features(bb, noisy, pe, pooled, sigma * 1000, list(vis), list(txt))
    v, t = head_tokens(head_sd, vf, tf, temb)
    return head_readout(head_sd, v, t, HEADS)[:, 0]


# ---------------------------------------------------------------------------------------- noise
def test_sigma_table_matches_spec_values():
    sigmas, timesteps = sigma_table()
    assert sigmas.shape == (1000,) and sigmas[0] == 1.0
    assert abs(float(sigmas[-1]) - 0.002997) < 1e-5
    torch.testing.assert_close(sigmas, sd35_sigma_table(), atol=1e-6, rtol=0)
    torch.testing.assert_close(timesteps, sigmas * 1000)
    s, t = nearest_sigma(torch.tensor([0.1, 0.4, 0.5, 0.9]), sigmas, timesteps)
    torch.testing.assert_close(s, torch.tensor([0.1008, 0.4003, 0.5, 0.9]), atol=1e-4, rtol=0)
    torch.testing.assert_close(t, torch.tensor([100.8, 400.3, 500.0, 900.0]), atol=0.1, rtol=0)


def test_sigma_for_uses_nearest_entry(tiny_rm):
    s, t = tiny_rm.sigma_for(0.4)
    assert abs(float(s) - 0.4003) < 1e-4 and abs(float(t) - 1000 * float(s)) < 1e-3


# ---------------------------------------------------------------------------------------- parity
def test_released_layout_loads_and_matches_reference(tmp_path, tiny_pipe, tiny_text):
    _, pe, pooled = tiny_text
    peft_model, head_sd, _ = _write_released_layout(tmp_path, tiny_pipe.transformer)
    rm = LatentRewardModel.from_pretrained(tmp_path, transformer=tiny_pipe.transformer)
    latents, noise = _latents(4, 1), _latents(4, 2)
    ours = rm.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4, noise=noise)
    with torch.no_grad():
        ref = _reference_score(peft_model, head_sd, latents, pe, pooled, noise, 0.4)
    torch.testing.assert_close(ours.detach(), ref, atol=1e-5, rtol=1e-4)
    assert ours.shape == (4,) and ours.dtype == torch.float32


def test_released_layout_without_text_taps_in_last_block_excludes_context_lora(tmp_path, tiny_pipe):
    cfg = tiny_reward_model_config(text_head_idx=[2], visual_head_idx=[2, 4])
    rm = LatentRewardModel.from_config(cfg, transformer=tiny_pipe.transformer)
    names = {n for n, _ in rm.backbone.named_parameters() if "lora_A" in n}
    assert not any(n.startswith("transformer_blocks.3.attn.add_q_proj") for n in names)
    assert any(n.startswith("transformer_blocks.3.attn.to_q") for n in names)
    assert any(n.startswith("transformer_blocks.2.attn.add_q_proj") for n in names)
    # attn2 (dual attention) is adapted through suffix matching
    assert any(".attn2.to_q." in n for n in names)


def test_head_state_dict_keys_match_released_names(tiny_rm):
    keys = set(tiny_rm.reward_head.state_dict())
    expected = {
        "layer_adapters_visual.0.layer_embed",
        "layer_adapters_visual.0.cond_mlp.0.weight",
        "layer_adapters_visual.0.cond_mlp.2.bias",
        "layer_adapters_text.1.proj.weight",
        "agg_visual.weight",
        "agg_text.bias",
        "query_tokens",
        "attn1.norm_q.weight",
        "attn1.norm_v.weight",
        "attn1.norm_t.weight",
        "attn1.to_k_text.weight",
        "attn1.to_v_text.bias",
        "attn1.to_out.0.weight",
        "attn1.gate_vis.0.weight",
        "attn1.gate_text.2.bias",
        "attn2.norm_q.weight",
        "attn2.to_k_vis.weight",
        "attn2.to_out.0.bias",
        "norm_ff.weight",
        "ff.0.weight",
        "ff.2.bias",
        "head.weight",
    }
    assert expected <= keys
    assert not any("proj_in" in k for k in keys)
    assert not any(k.startswith("attn2.norm_t") or k.startswith("attn2.gate") for k in keys)


# ---------------------------------------------------------------------------------------- round trip
def test_save_pretrained_round_trip_gives_identical_scores(tmp_path, tiny_pipe, tiny_rm, tiny_text):
    _, pe, pooled = tiny_text
    folder = tiny_rm.save_pretrained(tmp_path / "rm")
    assert (folder / "checkpoint" / "rm_head.safetensors").is_file()
    assert (folder / "checkpoint" / "backbone_lora" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".rm.tmp-*"))  # atomic write leaves no temp folder
    loaded = LatentRewardModel.from_pretrained(folder, transformer=tiny_pipe.transformer)
    lat, noise = _latents(4, 3), _latents(4, 4)
    a = tiny_rm.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    b = loaded.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_saved_lora_is_peft_loadable(tmp_path, tiny_pipe, tiny_rm):
    folder = tiny_rm.save_pretrained(tmp_path / "rm")
    plain = PlainBackbone(copy.deepcopy(tiny_pipe.transformer), 4)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(
        plain, str(folder / "checkpoint" / "backbone_lora"), adapter_name="rm_lora"
    )
    ours = {k: v for k, v in tiny_rm.backbone.state_dict().items() if "lora_" in k}
    theirs = {
        k.replace("base_model.model.", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k
    }
    assert set(ours) == set(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k])


def test_head_only_and_full_model_layouts(tmp_path, tiny_pipe, tiny_text):
    _, pe, pooled = tiny_text
    lat, noise = _latents(4, 5), _latents(4, 6)
    for overrides in (
        {"use_lora": False, "freeze_backbone": True},
        {"use_lora": False, "freeze_backbone": False},
    ):
        rm = tiny_reward_model(tiny_pipe.transformer, seed=3, **overrides)
        folder = rm.save_pretrained(tmp_path / str(overrides["freeze_backbone"]))
        names = {p.name for p in (folder / "checkpoint").iterdir()}
        assert names == (
            {"rm_head.safetensors"} if overrides["freeze_backbone"] else {"full_model.safetensors"}
        )
        loaded = LatentRewardModel.from_pretrained(folder, transformer=tiny_pipe.transformer)
        torch.testing.assert_close(
            rm.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise),
            loaded.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise),
        )


def test_logistic_output_is_bounded_and_round_trips(tmp_path, tiny_pipe, tiny_text):
    _, pe, pooled = tiny_text
    rm = tiny_reward_model(tiny_pipe.transformer, seed=4, use_logistic=True)
    with torch.no_grad():
        rm.eta3.fill_(0.3)
        rm.eta4.fill_(0.05)
    lat = _latents(4, 7) * 5
    raw = rm.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=_latents(4, 8))
    assert bool(((raw > -2) & (raw < 2)).all())
    loaded = LatentRewardModel.from_pretrained(
        rm.save_pretrained(tmp_path / "rm"), transformer=tiny_pipe.transformer
    )
    assert float(loaded.eta3) == pytest.approx(0.3) and float(loaded.eta4) == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------- behaviour
def test_determinism_with_noise_and_generator(tiny_rm, tiny_text):
    _, pe, pooled = tiny_text
    lat = _latents(4, 9)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
    a = tiny_rm.score(lat, generator=torch.Generator().manual_seed(1), **kw)
    b = tiny_rm.score(lat, generator=torch.Generator().manual_seed(1), **kw)
    c = tiny_rm.score(lat, generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, tiny_rm.score(lat, noise=noise, **kw), atol=0, rtol=0)


def test_n_noise_averages_independent_draws_in_one_pass(tiny_rm, tiny_text):
    _, pe, pooled = tiny_text
    lat = _latents(4, 10)
    noises = torch.randn(3, *lat.shape, generator=torch.Generator().manual_seed(5))
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
    avg = tiny_rm.score(lat, noise=noises, n_noise=3, **kw)
    manual = torch.stack([tiny_rm.score(lat, noise=n, **kw) for n in noises]).mean(0)
    torch.testing.assert_close(avg, manual, atol=1e-5, rtol=1e-5)


def test_gradients_reach_latents_and_trainable_parameters(tiny_pipe, tiny_text):
    _, pe, pooled = tiny_text
    rm = tiny_reward_model(tiny_pipe.transformer, seed=0)
    lat = _latents(4, 11).requires_grad_(True)
    rm.score(
        lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, generator=torch.Generator().manual_seed(0)
    ).sum().backward()
    assert lat.grad is not None and float(lat.grad.abs().sum()) > 0
    assert all(p.grad is None for p in rm.parameters())  # frozen by default
    params = rm.set_trainable(lora=True, head=True)
    assert params and all(
        "lora_" in n or n.startswith("reward_head") for n, p in rm.named_parameters() if p.requires_grad
    )
    rm.score(
        lat.detach(),
        prompt_embeds=pe,
        pooled_prompt_embeds=pooled,
        generator=torch.Generator().manual_seed(0),
    ).sum().backward()
    lora_b = [p for n, p in rm.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora_b)
    assert float(rm.reward_head.query_tokens.grad.abs().sum()) > 0
    base = [p for n, p in rm.backbone.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in base)


def test_ensemble_batched_pass_equals_per_level_computation(tiny_rm, tiny_text):
    _, pe, pooled = tiny_text
    lat, noise = _latents(4, 12), _latents(4, 13)
    us = (0.2, 0.5, 0.7)
    ours = tiny_rm.score_ensemble(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, us=us, noise=noise)
    head_sd = tiny_rm.reward_head.state_dict()
    vs, ts = [], []
    with torch.no_grad():
        for u in us:
            sigma, t = tiny_rm.sigma_for(torch.full((4,), u))
            noisy = (1 - sigma[:, None, None, None]) * lat + sigma[:, None, None, None] * noise
            # the reference forward over the reward model's own (LoRA-carrying) modules
            temb, vf, tf = backbone_features(
                PlainBackbone(tiny_rm.backbone, 4), noisy, pe, pooled, t, [2, 4], [2, 4]
            )
            v, tt = head_tokens(head_sd, vf, tf, temb)
            vs.append(v)
            ts.append(tt)
        ref = head_readout(head_sd, torch.cat(vs, 1), torch.cat(ts, 1), HEADS)[:, 0]
    torch.testing.assert_close(ours.detach(), ref, atol=1e-5, rtol=1e-4)
    # a single level through the ensemble path equals score()
    single = tiny_rm.score_ensemble(
        lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, us=(0.4,), noise=noise
    )
    torch.testing.assert_close(
        single, tiny_rm.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4, noise=noise)
    )


def test_share_base_weights_saves_memory_and_gives_identical_scores(tiny_text):
    _, pe, pooled = tiny_text
    pipe = tiny_sd3_pipeline(seed=0)
    own = tiny_reward_model(pipe.transformer, seed=0)
    shared = tiny_reward_model(pipe.transformer, seed=0, share_base_weights=True)
    lat, noise = _latents(4, 14), _latents(4, 15)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    torch.testing.assert_close(own.score(lat, **kw), shared.score(lat, **kw), atol=0, rtol=0)

    def storages(*modules):
        return {p.data_ptr(): p.numel() * p.element_size() for m in modules for p in m.parameters()}

    bytes_own = sum(storages(pipe.transformer, own).values())
    bytes_shared = sum(storages(pipe.transformer, shared).values())
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in own.backbone.named_parameters() if "lora_" not in n
    )
    assert bytes_own - bytes_shared == base_bytes > 0
    # the policy transformer itself is untouched: no adapters injected into it
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_policy_lora_on_transformer_does_not_leak_into_reward_model(tiny_text):
    _, pe, pooled = tiny_text
    pipe = tiny_sd3_pipeline(seed=0)
    before = tiny_reward_model(pipe.transformer, seed=0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn.to_q", "attn.to_k"]))
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    after = tiny_reward_model(pipe.transformer, seed=0)
    assert not any(".default." in n for n, _ in after.named_parameters())
    lat, noise = _latents(4, 16), _latents(4, 17)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    torch.testing.assert_close(before.score(lat, **kw), after.score(lat, **kw), atol=0, rtol=0)


def test_normalize_default_and_configurable(tiny_pipe):
    rm = tiny_reward_model(tiny_pipe.transformer, seed=0)
    torch.testing.assert_close(rm.normalize(torch.tensor([0.0, -10.0, 5.0])), torch.tensor([1.0, 0.0, 1.5]))
    rm.config.normalization.offset, rm.config.normalization.scale = 12.0, 10.0
    torch.testing.assert_close(rm.normalize(torch.tensor([0.0])), torch.tensor([1.2]))


def test_encode_prompts_matches_pipeline_and_caches(tiny_pipe):
    from dinalrm_align import PromptEmbeddingCache

    prompts = ["a red cube", "a blue ball"]
    pe, pooled = encode_prompts(tiny_pipe, prompts, max_sequence_length=16)
    ref_pe, _, ref_pooled, _ = tiny_pipe.encode_prompt(
        prompts, None, None, max_sequence_length=16, do_classifier_free_guidance=False
    )
    torch.testing.assert_close(pe, ref_pe, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    assert pe.shape == (2, 77 + 16, 32) and pooled.shape == (2, 64)
    cache = PromptEmbeddingCache()
    a = encode_prompts(tiny_pipe, prompts + prompts, max_sequence_length=16, cache=cache)
    assert len(cache) == 2
    b = encode_prompts(tiny_pipe, prompts, max_sequence_length=16, cache=cache)
    torch.testing.assert_close(a[0][:2], b[0])
    with pytest.raises(ValueError, match="at least one"):
        encode_prompts(tiny_pipe, [])


# ---------------------------------------------------------------------------------------- compat
def test_drm_inferencer_matches_upstream_semantics(tmp_path, tiny_pipe, tiny_text):
    from dinalrm_align.compat import DRMInferencer

    _, pe, pooled = tiny_text
    peft_model, head_sd, _ = _write_released_layout(tmp_path, tiny_pipe.transformer, seed=1)
    scorer = DRMInferencer(
        tiny_pipe,
        tmp_path / "config.json",
        tmp_path / "checkpoint",
        load_from_disk=True,
        device="cpu",
        model_dtype=torch.float32,
    )
    lat = _latents(4, 18)
    torch.manual_seed(123)
    out = scorer.reward({"encoder_hidden_states": pe, "pooled_projections": pooled}, lat, u=0.4)
    torch.manual_seed(123)
    noise = torch.randn_like(lat)
    with torch.no_grad():
        ref = _reference_score(peft_model, head_sd, lat, pe, pooled, noise, 0.4)
    assert out.shape == (4, 1)
    torch.testing.assert_close(out[:, 0].detach(), ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------- loading errors
def test_offline_hub_miss_is_a_clear_error(monkeypatch, tiny_pipe):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        LatentRewardModel.from_pretrained("nobody/not-a-dina-lrm", transformer=tiny_pipe.transformer)
    with pytest.raises(FileNotFoundError, match="not found"):
        LatentRewardModel.from_pretrained("/definitely/missing/folder", transformer=tiny_pipe.transformer)


def test_missing_checkpoint_files_are_named(tmp_path, tiny_pipe):
    _write_released_layout(tmp_path, tiny_pipe.transformer)
    (tmp_path / "checkpoint" / "rm_head.pt").unlink()
    with pytest.raises(FileNotFoundError, match="rm_head"):
        LatentRewardModel.from_pretrained(tmp_path, transformer=tiny_pipe.transformer)
    (tmp_path / "checkpoint" / "backbone_lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        LatentRewardModel.from_pretrained(tmp_path, transformer=tiny_pipe.transformer)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LatentRewardModel.from_pretrained(tmp_path, transformer=tiny_pipe.transformer)


def test_config_missing_key_is_named(tmp_path, tiny_pipe):
    _write_released_layout(tmp_path, tiny_pipe.transformer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["model"]["visual_head_idx"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="visual_head_idx"):
        LatentRewardModel.from_pretrained(tmp_path, transformer=tiny_pipe.transformer)


def test_head_key_mismatch_lists_keys(tmp_path, tiny_pipe):
    _write_released_layout(tmp_path, tiny_pipe.transformer)
    sd = torch.load(tmp_path / "checkpoint" / "rm_head.pt", weights_only=True)
    sd["bogus.weight"] = sd.pop("head.weight")
    torch.save(sd, tmp_path / "checkpoint" / "rm_head.pt")
    with pytest.raises(
        ValueError, match=r"missing keys \['head.weight'\].*unexpected keys \['bogus.weight'\]"
    ):
        LatentRewardModel.from_pretrained(tmp_path, transformer=tiny_pipe.transformer)


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "latents, match",
    [
        (torch.randn(2, 16, 32), "4-D"),
        (torch.randn(2, 4, 32, 32), "must have 16 channels"),
        (torch.randn(2, 16, 31, 32), "multiples of 2 for the sd3 backbone, got 31x32"),
        (torch.randn(2, 16, 80, 80), "position grid: at most 64x64"),
        (torch.full((2, 16, 32, 32), float("nan")), "NaN or Inf"),
        (torch.zeros(2, 16, 32, 32, dtype=torch.long), "floating-point"),
        ("not a tensor", "torch.Tensor"),
    ],
)
def test_bad_latents_raise_value_error(tiny_rm, tiny_text, latents, match):
    _, pe, pooled = tiny_text
    with pytest.raises(ValueError, match=match):
        tiny_rm.score(latents, prompt_embeds=pe[:2], pooled_prompt_embeds=pooled[:2])


def test_bad_conditions_u_and_noise_raise_value_error(tiny_rm, tiny_text):
    _, pe, pooled = tiny_text
    lat = _latents(4)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        tiny_rm.score(lat[:3], **kw)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        tiny_rm.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled[:2])
    with pytest.raises(ValueError, match=r"prompt_embeds width 16 .*expects 32"):
        tiny_rm.score(lat, prompt_embeds=pe[..., :16], pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds width 10 .*expects 64"):
        tiny_rm.score(lat, prompt_embeds=pe, pooled_prompt_embeds=pooled[:, :10])
    for u in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            tiny_rm.score(lat, u=u, **kw)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_rm.score_ensemble(lat, us=(0.2, 1.2), **kw)
    with pytest.raises(ValueError, match="noise must have shape"):
        tiny_rm.score(lat, noise=torch.randn(4, 16, 16, 16), **kw)
    with pytest.raises(ValueError, match="NaN or Inf"):
        tiny_rm.score(lat, prompt_embeds=pe * float("inf"), pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match="n_noise"):
        tiny_rm.score(lat, n_noise=0, **kw)


def test_base_transformer_is_loaded_from_config_when_omitted(tmp_path, tiny_pipe, tiny_text):
    _, pe, pooled = tiny_text
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    rm = tiny_reward_model(tiny_pipe.transformer, seed=2, backbone_model_id=str(tmp_path / "pipe"))
    folder = rm.save_pretrained(tmp_path / "rm")
    loaded = LatentRewardModel.from_pretrained(folder)  # no transformer: read backbone_model_id/transformer
    lat, noise = _latents(4, 20), _latents(4, 21)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    torch.testing.assert_close(rm.score(lat, **kw), loaded.score(lat, **kw), atol=1e-6, rtol=1e-6)
    rm.config.backbone_model_id = str(tmp_path / "nowhere")
    rm.save_pretrained(tmp_path / "rm2")
    with pytest.raises(FileNotFoundError, match=r"could not load the SD3Transformer2DModel of .*nowhere"):
        LatentRewardModel.from_pretrained(tmp_path / "rm2")


def test_merging_the_reward_lora_keeps_scores(tiny_pipe, tiny_text):
    _, pe, pooled = tiny_text
    rm = tiny_reward_model(tiny_pipe.transformer, seed=5)
    lat, noise = _latents(4, 22), _latents(4, 23)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=noise)
    before = rm.score(lat, **kw)
    rm.merge_reward_lora()
    assert rm.lora_merged
    torch.testing.assert_close(rm.score(lat, **kw), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        rm.set_trainable(lora=True)
    shared = tiny_reward_model(tiny_pipe.transformer, seed=5, share_base_weights=True)
    with pytest.raises(ValueError, match="shared"):
        shared.merge_reward_lora()


def test_reward_model_builds_and_scores_on_the_meta_device():
    from diffusers import SD3Transformer2DModel

    from dinalrm_align.tiny import TINY_TRANSFORMER_KWARGS

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**TINY_TRANSFORMER_KWARGS)
    rm = LatentRewardModel.from_config(tiny_reward_model_config(), transformer=transformer, device="meta")
    with torch.device("meta"):
        out = rm.score(
            torch.empty(2, 16, 32, 32),
            prompt_embeds=torch.empty(2, 93, 32),
            pooled_prompt_embeds=torch.empty(2, 64),
        )
    assert out.shape == (2,) and out.device.type == "meta"
