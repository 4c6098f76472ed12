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
from benchmarks import families  # noqa: E402
from benchmarks.measure import PeakTensorMemory, alternating_medians  # noqa: E402
from benchmarks.reference import (  # noqa: E402
    ReferenceLatentReward,
    analytic_forward_flops,
    analytic_output_layer_flops,
)
from benchmarks.reference_families import (  # noqa: E402
    ReferenceFluxReward,
    ReferenceZImageReward,
    analytic_flux_forward_flops,
    analytic_zimage_forward_flops,
)


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

    def score():
        return rm.score(
            x["latents"], prompt_embeds=x["prompt_embeds"], pooled_prompt_embeds=x["pooled_prompt_embeds"], noise=x["noise"]
        )

    with C.skip_finite_checks_on_meta():
        project = C.count_flops(score)
        output_layers = C.unused_output_flops(rm, score)
    unmerged = analytic_forward_flops(preset.transformer, preset.rm_model, n_img, n_txt, lora=True)
    # the project computes the minimum exactly, plus (if its backbone forward runs them) the transformer's
    # output layers, which the head never reads
    assert output_layers in (0, analytic_output_layer_flops(preset.transformer, n_img))
    assert project.forward == unmerged["total"] + output_layers


@pytest.mark.parametrize("name", families.FAMILIES)
def test_family_reward_equals_the_architecture_minimum_exactly(name: str) -> None:
    """FLUX.1 / Z-Image at tiny size: the project's reward model computes exactly its kept blocks, embedders,
    reward LoRA and head, forward and backward, as counted on an independent re-implementation and in closed
    form (64 px: 16 image tokens, which Z-Image pads to 32, and a 16-token caption, padded to 32)."""
    fam = families.get_family(name, "tiny")
    tr = families.build_transformer(fam)
    x = families.inputs(fam, 64, 16)
    rm = families.build_reward_model(fam, tr)
    z = x["latents"]
    project = C.count_flops(lambda: rm.score(z.detach().requires_grad_(True), prompt_embeds=x["prompt_embeds"],
                                             pooled_prompt_embeds=x["pooled_prompt_embeds"], u=0.4,
                                             noise=x["noise"]), backward=True)
    counted = {}
    for lora in ("unmerged", "merged"):
        if name == "flux":
            ref = ReferenceFluxReward(tr, fam.reward_model, lora=lora)
            counted[lora] = C.count_flops(lambda ref=ref: ref.score(z.detach().requires_grad_(True), x["noise"],
                                          x["prompt_embeds"], x["pooled_prompt_embeds"], 0.4, 3.5), backward=True)
            closed = analytic_flux_forward_flops(fam.transformer, fam.reward_model, 16, 16, lora=lora == "unmerged")
        else:
            ref = ReferenceZImageReward(tr, fam.reward_model, lora=lora)
            counted[lora] = C.count_flops(lambda ref=ref: ref.score(z.detach().requires_grad_(True), x["noise"],
                                          x["prompt_embeds"], 0.4), backward=True)
            closed = analytic_zimage_forward_flops(fam.transformer, fam.reward_model, 16, 16, lora=lora == "unmerged")
        assert counted[lora].forward == closed["total"] > 0
        assert closed["lora"] == 0 if lora == "merged" else closed["lora"] > 0
    assert project.forward == counted["unmerged"].forward
    assert project.total == counted["unmerged"].total > project.forward
    assert counted["merged"].total < counted["unmerged"].total
    # the reward stops at its deepest tap: nothing of the dropped blocks or output layers is counted
    assert C.unused_output_flops(rm, lambda: rm.score(z, prompt_embeds=x["prompt_embeds"],
                                                      pooled_prompt_embeds=x["pooled_prompt_embeds"],
                                                      noise=x["noise"])) == 0


def test_families_reject_unknown_names_and_presets() -> None:
    with pytest.raises(ValueError, match="unknown family"):
        families.get_family("sdxl")
    with pytest.raises(ValueError, match="presets 'full' and 'tiny'"):
        families.get_family("flux", "small")
    full = families.get_family("zimage")
    assert (full.num_steps, full.k_low, full.k_high, full.embedded_guidance) == (8, 4, 7, None)
    assert families.sequence_tokens(full, 1024, 100) == (4096, 128)  # captions padded to a multiple of 32


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
    doc = tmp_path / "doc.md"
    doc.write_text("# Benchmarks\n")
    flops.main(
        [
            "--preset",
            "tiny",
            "--resolutions",
            "64",
            "--t5-lengths",
            "16",
            "--family-text-length",
            "16",
            "--vlm-cap",
            "0",
            "--json",
            str(out),
            "--markdown",
            str(md),
            "--update-doc",
            str(doc),
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
    output_layers = entry["latent_reward_output_layers_forward"]
    assert output_layers in (0, analytic_output_layer_flops(C.get_preset("tiny").transformer, entry["image_tokens"]))
    minimum = entry["analytic_forward"]["unmerged_lora"]["total"]
    assert entry["latent_reward"]["forward"] == minimum + output_layers
    assert entry["overhead"]["forward_vs_minimum_unmerged"] == pytest.approx(output_layers / minimum)
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
    # FLUX.1-dev and Z-Image-Turbo rows
    assert set(data["families"]) == {"flux", "zimage"}
    for name, fam in data["families"].items():
        (e,) = fam["configs"]
        assert (e["resolution"], e["text_length"]) == (64, 16)
        ours, minimum = e["latent_reward"], e["reference_unmerged_lora"]
        assert (ours["forward"], ours["total"]) == (minimum["forward"], minimum["total"]), name
        assert ours["forward"] == e["analytic_forward"]["unmerged_lora"]["total"]
        assert e["overhead"]["fwd_bwd_vs_minimum_unmerged"] == 0 and e["overhead"]["forward_vs_minimum_merged"] > 0
        assert e["latent_reward_output_layers_forward"] == 0
        assert e["vae_decode"] == entry["vae_decode"]  # the FLUX AE has the SD3 VAE's architecture
        assert e["policy_graded_fwd_bwd"]["total"] > e["policy_forward"] > 0
        steps = fam["sampling"]
        assert not steps["cfg"] and steps["k_high"] < steps["num_steps"]
        assert [r["graded_per_rollout"] for r in e["refl"]] == [1, 2, 4]
        g1 = e["refl"][0]
        assert g1["rollout"] == pytest.approx(g1["rollout_steps"] * e["policy_forward"])
        assert g1["rollout_steps"] == pytest.approx((steps["k_low"] + steps["k_high"]) / 2)
        for row in e["refl"]:
            assert row["total_ours"] == pytest.approx(row["rollout"] + row["graded_step"] + row["reward_ours"])
            assert row["total_ratio_ours_over_pixel_vlm_g1"] <= row["total_ratio_ours_over_pixel_vlm"] + 1e-12
        assert e["refl"][1]["rollout"] < g1["rollout"]  # amortised over two graded steps
        half = e["half_vlm_cost"]
        assert half["floor_same_recipe"] == pytest.approx(g1["update_ratio_ours_over_pixel_vlm"])
        if half["graded_per_rollout"] is not None:
            assert half["ratio"] <= 0.5 and half["k_window"][1] == steps["k_high"]
    assert "FLUX.1-dev and Z-Image-Turbo" in text and "ReFL per graded sample, Z-Image-Turbo" in text
    body = doc.read_text()
    assert body.count("<!-- flops:begin -->") == 1 and body.count("<!-- flops-families:begin -->") == 1


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
