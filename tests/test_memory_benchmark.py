"""The peak-memory model (benchmarks/memory*.py): its tools, a tiny quick run, and the CPU validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from benchmarks import common as C
from benchmarks import memory, memory_check
from benchmarks import memory_model as M
from benchmarks import memory_workloads as W
from benchmarks.memory_backbones import get_backbone, sd3_backbone

TINY = ["--preset", "tiny", "--resolution", "64", "--t5-length", "16"]


# ------------------------------------------------------------------------------------------ tools


def test_cuda_autocast_policy_runs_cuda_fp32_ops_in_fp32_and_is_removed_after():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.randn(3, 8)
    with M.autocast(torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.float32  # CPU autocast alone keeps bf16
        assert F.group_norm(x.view(4, 8, 1), 2).dtype == torch.float32
        assert torch.softmax(x, -1).dtype == torch.float32
        assert x.exp().dtype == torch.float32
        assert x.sum().dtype == torch.float32
        assert x.sum(-1, dtype=torch.bfloat16).dtype == torch.bfloat16  # an explicit dtype is respected
        assert F.linear(x.float(), w).dtype == torch.bfloat16  # lower-precision list unchanged
        assert F.silu(x).dtype == torch.bfloat16  # not on any list
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16  # kernels unregistered again
    with M.autocast(torch.float32):
        assert F.linear(x.float(), w).dtype == torch.float32


def test_peak_tracker_counts_live_bytes_and_frozen_models():
    a = torch.randn(1000)  # 4000 bytes
    frozen = nn.Linear(10, 10).requires_grad_(False)  # the stock MemTracker hooks every parameter and fails
    trainable = nn.Linear(10, 10, bias=False)  # 400 bytes
    tracker = M.PeakTracker()
    tracker.track_external(frozen, a, trainable)
    start = tracker.current()["Total"]
    assert start == 4000 + 440 + 400
    with tracker:
        b = a * 2
        c = b + 1  # peak: b and c live
        del b
        d = c * 3
        assert tracker.current()["Total"] - start == 8000  # c and d
        del c, d
        loss = trainable(frozen(a[:10].unsqueeze(0))).sum()
        loss.backward()
    assert tracker.peak()["Total"] - start == 8000
    assert tracker.current()["Gradient"] == 400  # trainable.weight.grad, fp32
    assert trainable.weight.grad is not None and frozen.weight.grad is None


def test_to_fake_keeps_sharing_dtype_and_trainable_flags():
    mode = M.new_fake_mode()
    with torch.device("meta"):
        a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    b.weight = a.weight  # tied
    a.bias.requires_grad_(False)
    memo: dict = {}
    M.to_fake(a, mode, memo=memo)
    M.to_fake(b, mode, memo=memo)
    assert isinstance(a.weight, FakeTensor) and a.weight.device.type == "cpu"
    assert a.weight is b.weight and not a.bias.requires_grad and a.weight.requires_grad
    assert M.tensor_bytes(a, b) == (64 * 64 + 64 + 64) * 4
    with pytest.raises(ValueError, match="meta-device"):
        M.to_fake(nn.Linear(2, 2), mode)


def test_fake_mode_keeps_literals_and_counts_value_reads():
    mode = M.new_fake_mode()
    with mode:
        grid = torch.tensor([[1, 6, 8]])
        assert grid.tolist() == [[1, 6, 8]]  # literal bookkeeping keeps real values
        x = torch.randn(3, 4)
        assert bool(torch.isfinite(x).all()) is True  # no data: answered, counted
    assert mode.value_reads == 1


def test_bad_inputs_are_rejected_clearly():
    bb = sd3_backbone(C.get_preset("tiny"))
    with pytest.raises(ValueError, match="kind"):
        W.Models(bb, ["dina"], W.Setting(resolution=64, t5_length=16), kind="gpu")
    with pytest.raises(ValueError, match="unknown reward"):
        W.Models(bb, ["pickscore"], W.Setting(resolution=64, t5_length=16))
    with pytest.raises(ValueError, match="unknown validation workload"):
        memory_check.predict("nope")
    with pytest.raises(SystemExit):
        memory.main([*TINY[:2], "--resolution", "0"])
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone("sdxl", "tiny")
    with pytest.raises(ValueError, match="unknown row kinds"):
        memory.plan(False, ["dina"], ["training"])
    with pytest.raises(ValueError, match="cannot share"):
        W.latent_reward(merged=True, shared=True)


# ------------------------------------------------------------------------------------------ runs


def test_fake_prediction_equals_tracking_the_real_update():
    """The same tiny ReFL update, fake tensors vs real tensors, through the same tracker."""
    setting = W.Setting(resolution=64, t5_length=16, dtype=torch.float32, kl_beta=0.0)
    bb = sd3_backbone(C.get_preset("tiny"))
    out = {}
    for kind in ("fake", "real"):
        models = W.Models(bb, ["dina"], setting, kind=kind)
        out[kind] = memory.measure_row(models, memory.Row("refl", "dina"), "dina")
    assert out["real"]["dynamic_peak_bytes"] > 0
    assert out["fake"]["dynamic_peak_bytes"] == pytest.approx(out["real"]["dynamic_peak_bytes"], rel=0.01)
    assert out["fake"]["tracked_weights_bytes"] == out["real"]["tracked_weights_bytes"]


def test_quick_run_writes_json_and_report(tmp_path: Path):
    path = tmp_path / "memory.json"
    md = tmp_path / "memory.md"
    result = memory.main([*TINY, "--quick", "--json", str(path), "--markdown", str(md)])
    data = json.loads(path.read_text())
    assert data["quick"] and data["setting"]["resolution"] == 64
    kinds = {(r["kind"], r["reward"], r["policy_ckpt"]) for r in data["rows"]}
    assert {("refl", "dina", False), ("refl", "dina", True), ("refl", "clip", False), ("refl", "vlm", False),
            ("grpo", None, False), ("reward", "dina", False)} <= kinds
    for row in data["rows"]:
        w = row["weights_bytes"]
        assert row["tracked_weights_bytes"] > 0
        assert row["peak_update_bytes"] >= row["tracked_weights_bytes"] + row["optimizer_bytes"]
        if row["kind"] in ("refl", "reward"):  # the tracker saw exactly the weights the builders report
            assert row["tracked_weights_bytes"] == w["policy_base"] + w["policy_lora"] + w["reward"] + w["vae_decoder"]
        if row["kind"] == "refl":
            assert row["activation_bytes"] > 0 and row["phase"] in ("forward", "backward", "optimizer")
    refl = {(r["reward"], r["policy_ckpt"]): r for r in data["rows"] if r["kind"] == "refl"}
    assert refl[("dina", True)]["activation_bytes"] < refl[("dina", False)]["activation_bytes"]
    grpo = next(r for r in data["rows"] if r["kind"] == "grpo")
    assert set(grpo["peak_with_reward_bytes"]) == {"dina", "dina_merged", "dina_shared", "clip", "vlm"}
    # sharing the policy's base weights: the reward only adds its head and LoRA while it idles
    assert grpo["peak_with_reward_bytes"]["dina_shared"] < grpo["peak_with_reward_bytes"]["dina"]
    assert min(grpo["peak_with_reward_bytes"].values()) > grpo["tracked_peak_bytes"]
    assert grpo["peak_update_bytes"] == grpo["peak_with_reward_bytes"]["dina"]
    text = md.read_text()
    assert "**ReFL update**" in text and "**GRPO update**" in text and result["rows"] == data["rows"]


@pytest.mark.parametrize("backbone", ["flux", "zimage"])
def test_family_refl_rows_quick(tmp_path: Path, backbone: str):
    """FLUX.1-dev / Z-Image-Turbo at tiny size: the quick ReFL rows run and account for every weight byte."""
    path = tmp_path / "memory.json"
    memory.main([*TINY, "--backbone", backbone, "--quick", "--rewards", "dina", "clip", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["backbone_key"] == backbone and data["quick"]
    refl = {(r["reward"], r["policy_ckpt"]): r for r in data["rows"]}
    assert set(refl) == {("dina", False), ("dina", True), ("clip", False)}
    assert {r["kind"] for r in data["rows"]} == {"refl"}  # the families' default: ReFL rows only
    for row in data["rows"]:
        w = row["weights_bytes"]
        assert row["tracked_weights_bytes"] == w["policy_base"] + w["policy_lora"] + w["reward"] + w["vae_decoder"]
        assert row["activation_bytes"] > 0
    # checkpointing never raises the peak (at this size the AdamW step may hold it: then they are equal)
    assert refl[("dina", True)]["peak_update_bytes"] <= refl[("dina", False)]["peak_update_bytes"]
    assert refl[("dina", False)]["weights_bytes"]["vae_decoder"] == 0 < refl[("clip", False)]["weights_bytes"]["vae_decoder"]


def test_shared_base_weights_leave_only_head_and_lora_to_the_reward():
    """``share_base_weights``: the reward's kept blocks are the policy's tensors, so the ReFL update holds one
    copy of them; the update runs the same ops either way."""
    setting = W.Setting(resolution=64, t5_length=16, kl_beta=0.0)
    models = W.Models(get_backbone("zimage", "tiny"), ["dina", "dina_shared"], setting, kind="fake")
    own, shared = (memory.measure_row(models, memory.Row("refl", key), key) for key in ("dina", "dina_shared"))
    rm_shared = models.reward_modules["dina_shared"]["reward_model"]
    head_and_lora = M.tensor_bytes(rm_shared.reward_head) + sum(
        p.numel() * p.element_size() for n, p in rm_shared.named_parameters() if "lora_" in n)
    assert shared["weights_bytes"]["reward"] == head_and_lora < own["weights_bytes"]["reward"]
    # one copy of the kept blocks fewer is resident, and the peak drops at least by it
    saved = own["weights_bytes"]["reward"] - head_and_lora
    assert own["tracked_weights_bytes"] - shared["tracked_weights_bytes"] == saved > 0
    assert own["peak_update_bytes"] - shared["peak_update_bytes"] >= saved
    assert memory.default_paths("flux", True)[0].name == "memory_flux_quick.json"
    assert memory.default_paths("sd3", False) == (memory.DEFAULT_JSON, "memory")


@pytest.mark.slow
def test_memory_model_matches_peak_rss_of_a_real_update_within_15_percent():
    """Fake-tensor prediction vs the peak RSS of the same update run for real in a fresh process."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the peak RSS")
    result = memory_check.validate(("refl_dina", "refl_dina_bf16", "refl_clip"))
    for name, w in result["workloads"].items():
        assert w["measured_rss_bytes"] > 50e6, name  # far above RSS noise
        assert abs(w["relative_error"]) <= memory_check.TOLERANCE, (name, w)
        assert w["fake_vs_real_tracker"] == pytest.approx(0.0, abs=0.01), (name, w)
    assert result["ok"]
