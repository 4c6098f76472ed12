"""Smoke tests of the benchmark scripts at tiny size: they run and produce sane tables/JSON.

No wall-clock assertions: only structure, positivity, finiteness and orderings that hold by
construction (forward + backward costs more than forward).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common as C  # noqa: E402
from benchmarks.measure import PeakTensorMemory, alternating_medians  # noqa: E402
from benchmarks.reference import ReferenceLatentReward, analytic_forward_flops  # noqa: E402


def _finite_positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_expected_rollout_steps() -> None:
    assert C.expected_rollout_steps(30, 39, 1) == pytest.approx(34.5)
    assert C.expected_rollout_steps(30, 39, 10) == pytest.approx(39.0)
    steps = [C.expected_rollout_steps(30, 39, g) for g in range(1, 11)]
    assert steps == sorted(steps)
    with pytest.raises(ValueError):
        C.expected_rollout_steps(30, 39, 0)


def test_qwen_image_tokens() -> None:
    assert C.qwen_grid(512) == (36, 36) and C.vlm_image_tokens(512) == 324
    assert C.qwen_grid(1024) == (74, 74) and C.vlm_image_tokens(1024) == 1369


def test_reference_minimum_matches_closed_form_and_project() -> None:
    preset = C.get_preset("tiny")
    tr = C.build_transformer(preset)
    x = C.sd3_inputs(preset, 64, 16)
    n_img, n_txt = (64 // 8 // 2) ** 2, C.text_tokens(16)
    for lora in ("unmerged", "merged"):
        ref = ReferenceLatentReward(tr, preset.rm_model, lora=lora)
        counted = C.count_flops(
            lambda ref=ref: ref.score(x["latents"], x["noise"], x["prompt_embeds"], x["pooled_prompt_embeds"])
        )
        closed = analytic_forward_flops(
            preset.transformer, preset.rm_model, n_img, n_txt, lora=lora == "unmerged"
        )
        assert counted.forward == closed["total"] > 0
    rm = C.build_reward_model(preset, tr, device="meta")
    with C.skip_finite_checks_on_meta():
        project = C.count_flops(
            lambda: rm.score(
                x["latents"],
                prompt_embeds=x["prompt_embeds"],
                pooled_prompt_embeds=x["pooled_prompt_embeds"],
                noise=x["noise"],
            )
        )
    unmerged = analytic_forward_flops(preset.transformer, preset.rm_model, n_img, n_txt, lora=True)
    assert project.forward == unmerged["total"]


def test_peak_tensor_memory_and_timing() -> None:
    lin = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]).requires_grad_(False)
    x = torch.randn(32, 64, requires_grad=True)
    with PeakTensorMemory() as with_grad:
        lin(x).sum().backward()
    with PeakTensorMemory() as no_grad, torch.no_grad():
        lin(x).sum()
    assert with_grad.peak_bytes > no_grad.peak_bytes > 0
    stats = alternating_medians({"a": lambda: lin(x), "b": lambda: lin(x)}, repeats=2, warmup=0)
    assert set(stats) == {"a", "b"} and all(s.median >= 0 and s.repeats == 2 for s in stats.values())


def test_replace_doc_section(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\ntext\n")
    C.replace_doc_section(doc, "flops", "first")
    C.replace_doc_section(doc, "flops", "second")
    body = doc.read_text()
    assert body.count("<!-- flops:begin -->") == 1 and "second" in body and "first" not in body
    assert body.startswith("# Title")


def test_flops_script_tiny(tmp_path: Path) -> None:
    from benchmarks import flops

    out = tmp_path / "flops.json"
    md = tmp_path / "flops.md"
    flops.main(
        [
            "--preset",
            "tiny",
            "--resolutions",
            "64",
            "--t5-lengths",
            "16",
            "--vlm-cap",
            "0",
            "--json",
            str(out),
            "--markdown",
            str(md),
        ]
    )
    data = json.loads(out.read_text())
    (entry,) = data["configs"]
    for key in (
        "latent_reward",
        "reference_unmerged_lora",
        "reference_merged_lora",
        "vae_decode",
        "clip_h",
        "vlm",
        "policy_graded_fwd_bwd",
    ):
        c = entry[key]
        assert _finite_positive(c["forward"]) and c["total"] > c["forward"], key
    for key in ("pixel_clip", "pixel_vlm"):
        assert entry[key]["total"] > entry[key]["forward"] > 0
    assert entry["latent_reward"]["forward"] == entry["analytic_forward"]["unmerged_lora"]["total"]
    assert entry["overhead"]["forward_vs_minimum_unmerged"] == pytest.approx(0.0)
    assert all(_finite_positive(v) for v in entry["ratios"].values())
    assert len(entry["refl"]) == len(flops.SCENARIOS)
    for row in entry["refl"]:
        assert row["rollout"] > 0 and row["total_ours"] > row["update_ours"] > row["reward_ours"] > 0
        assert _finite_positive(row["total_ratio_ours_over_pixel_vlm"])
    # cheaper options cost less rollout per graded sample than the paper recipe
    paper, no_cfg = entry["refl"][0], entry["refl"][1]
    assert no_cfg["rollout"] == pytest.approx(paper["rollout"] / 2)
    assert entry["refl"][2]["rollout"] < paper["rollout"]
    comparison = data["paper_comparison"]["64"]
    assert math.isfinite(comparison["reward_fwd_reduction_pct"])
    text = md.read_text()
    assert "| resolution |" in text and "ours / pixel+VLM" in text


def test_cpu_script_tiny(tmp_path: Path) -> None:
    from benchmarks import cpu

    out = tmp_path / "cpu.json"
    cpu.main(
        [
            "--preset",
            "tiny",
            "--resolution",
            "64",
            "--t5-length",
            "16",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-full-scale-share",
            "--json",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert data["reward_model_implementation"] == "project"
    for name, v in data["reward"].items():
        assert v["median_s"] > 0 and v["peak_tensor_bytes"] > 0, name
    assert (
        data["reward"]["latent_fwd_bwd"]["peak_tensor_bytes"]
        > data["reward"]["latent_fwd"]["peak_tensor_bytes"]
    )
    for key in ("latent", "pixel_clip"):
        assert data["reward_flops"][key]["total"] > data["reward_flops"][key]["forward"] > 0
    assert all(math.isfinite(v) and v > 0 for v in data["ratios"].values())
    assert data["ensemble"]["max_abs_difference"] < 1e-4
    share = data["share_base_weights"]["measured_fp32"]
    assert share["separate"] > share["shared"] > 0


def test_gpu_script_small_on_cpu(tmp_path: Path) -> None:
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    gpu.main(["--small", "--repeats", "1", "--warmup", "0", "--json", str(out), "--update-doc", str(doc)])
    data = json.loads(out.read_text())
    entry = data["resolutions"]["64"]
    for mode in ("plain", "checkpointing"):
        for name, v in entry[mode].items():
            if isinstance(v, dict):
                assert v["median_s"] > 0 and v["peak_bytes"] >= v["weights_bytes"] > 0, (mode, name)
    assert (
        entry["plain"]["latent_fwd_bwd"]["activation_bytes"]
        > entry["plain"]["latent_fwd"]["activation_bytes"]
    )
    # checkpointing keeps fewer activations alive during the graded update
    assert (
        entry["checkpointing"]["refl_graded_latent"]["activation_bytes"]
        < entry["plain"]["refl_graded_latent"]["activation_bytes"]
    )
    text = doc.read_text()
    assert "<!-- gpu:begin -->" in text and "Card:" in text
