"""Real-scale FLOPs of the latent reward vs pixel-space rewards, counted on the meta device.

The published architectures are built from their configs under ``torch.device("meta")`` (no
weights, no memory, no GPU) and every call is counted with ``FlopCounterMode`` (2 FLOPs per
multiply-add; matmuls, convolutions and attention). Batch 1, square images.

Counted, per resolution and T5 length:

* DiNa-LRM (the project's ``LatentRewardModel``, 12 blocks + head + reward LoRA): forward, and
  forward + backward to the latents (what ReFL pays); the architecture minimum from an
  independent re-implementation (LoRA unmerged and merged) and a closed-form count;
* pixel-space rewards: SD3.5 VAE decode (fwd, fwd+bwd) + CLIP ViT-H/14 (PickScore/HPSv2 class),
  and + Qwen2-VL-7B (HPSv3 class) with its image tokens at that resolution;
* the ReFL update of SD3.5-Medium (policy LoRA r 32) per graded sample: no-grad rollout (with
  or without CFG), graded policy step (fwd + bwd), reward (fwd + bwd); for the paper's recipe
  and the cheaper options (no-CFG rollout, several graded steps per rollout).

Usage::

    python -m benchmarks.flops                                  # full scale, ~1-2 min on 2 cores
    python -m benchmarks.flops --update-doc docs/benchmarks.md  # also refresh the doc's section
    python -m benchmarks.flops --preset tiny --resolutions 64 --t5-lengths 16   # tests
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/x.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from benchmarks.reference import ReferenceLatentReward, analytic_forward_flops  # noqa: E402

DEFAULT_JSON = C.REPO_ROOT / "benchmarks" / "results" / "flops.json"

#: Paper (spec dina_lrm.md 5.3): TFLOPs per step read off the README figure, ReFL, DiNa-LRM vs HPSv3.
PAPER = {
    "sampling": {"ours": 209.0, "hpsv3": 209.0},
    "reward": {"ours": 3.0, "hpsv3": 11.0, "reduction_pct": 71.1},
    "update": {"ours": 18.5, "hpsv3": 34.5, "reduction_pct": 46.4},
    "total": {"ours": 231.0, "hpsv3": 255.0},
}

#: Sensitivity row: the VLM fed a downscaled image (448 px -> 256 image tokens), a common reward-model
#: pixel budget (256 x 28 x 28). The issue's main comparison uses the image tokens at full resolution.
VLM_CAPPED_RESOLUTION = 448

#: ReFL graded-step window of the paper's recipe: k uniform in [30, 39] of 40 steps.
K_LOW, K_HIGH = 30, 39


@dataclass(frozen=True)
class Scenario:
    """One way of paying for a graded sample."""

    name: str
    cfg: bool
    graded_per_rollout: int

    @property
    def rollout_steps(self) -> float:
        return C.expected_rollout_steps(K_LOW, K_HIGH, self.graded_per_rollout)

    @property
    def rollout_forwards(self) -> float:
        """Policy forward passes (batch-1 equivalents) of the no-grad rollout per graded sample."""
        return self.rollout_steps * (2 if self.cfg else 1) / self.graded_per_rollout


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("paper recipe: CFG rollout, 1 graded step per rollout", True, 1),
    Scenario("no-CFG rollout, 1 graded step per rollout", False, 1),
    Scenario("CFG rollout, 4 graded steps per rollout", True, 4),
    Scenario("no-CFG rollout, 4 graded steps per rollout", False, 4),
)


def _fb(forward: Callable[[], torch.Tensor]) -> C.FlopCount:
    return C.count_flops(forward, backward=True)


class MetaModels:
    """Every model of a preset, built once on the meta device."""

    def __init__(self, preset: C.Preset) -> None:
        self.preset = preset
        self.transformer = C.build_transformer(preset)
        self.rm_error: str | None = None
        self.rm_meta_workaround = False
        try:
            self.rm = C.build_reward_model(preset, self.transformer, device="meta")
        except Exception as exc:  # noqa: BLE001 - reported, the reference is counted instead
            self.rm = None
            self.rm_error = f"from_config on meta failed: {type(exc).__name__}: {exc}"
        self.ref_unmerged = ReferenceLatentReward(self.transformer, preset.rm_model, lora="unmerged")
        self.ref_merged = ReferenceLatentReward(self.transformer, preset.rm_model, lora="merged")
        self.policy = C.build_transformer(preset)
        C.add_policy_lora(self.policy, preset)
        self.vae = C.build_vae(preset)
        self.clip = C.build_clip(preset)
        self.vlm = C.build_vlm(preset)

    # ------------------------------------------------------------------ reward model
    def project_reward(self, x: dict[str, torch.Tensor]) -> C.FlopCount | None:
        """Project RM fwd+bwd; falls back to the meta workaround once (and records why)."""
        if self.rm is None:
            return None

        def call() -> torch.Tensor:
            z = x["latents"].detach().requires_grad_(True)
            return self.rm.score(z, prompt_embeds=x["prompt_embeds"], pooled_prompt_embeds=x["pooled_prompt_embeds"],
                                 u=0.4, noise=x["noise"])

        if not self.rm_meta_workaround:
            try:
                return _fb(call)
            except Exception as exc:  # noqa: BLE001
                self.rm_meta_workaround = True
                self.rm_error = f"rm.score on meta failed: {type(exc).__name__}: {exc}"
        with C.skip_finite_checks_on_meta():
            return _fb(call)

    def reference_reward(self, x: dict[str, torch.Tensor], merged: bool) -> C.FlopCount:
        ref = self.ref_merged if merged else self.ref_unmerged
        return _fb(lambda: ref.score(x["latents"].detach().requires_grad_(True), x["noise"], x["prompt_embeds"],
                                     x["pooled_prompt_embeds"], 0.4))

    # ------------------------------------------------------------------ policy
    def policy_graded(self, x: dict[str, torch.Tensor]) -> C.FlopCount:
        """Graded step: LoRA policy forward with grad, backward into the LoRA (z_k needs no grad)."""
        return _fb(lambda: C.transformer_velocity(self.policy, x["latents"], x["prompt_embeds"],
                                                  x["pooled_prompt_embeds"], 0.2))

    # ------------------------------------------------------------------ pixel rewards
    def vae_decode(self, resolution: int) -> C.FlopCount:
        h = resolution // self.preset.vae_factor
        z = torch.empty(1, 16, h, h, device="meta")
        return _fb(lambda: C.vae_decode(self.vae, z.requires_grad_(True)))

    def clip_score(self, resolution: int) -> C.FlopCount:
        images = torch.empty(1, 3, resolution, resolution, device="meta")
        ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
        return _fb(lambda: C.clip_score(self.clip, images.requires_grad_(True), ids))

    def vlm_score(self, resolution: int) -> C.FlopCount:
        images = torch.empty(1, 3, resolution, resolution, device="meta")
        return _fb(lambda: C.vlm_score(self.vlm, images.requires_grad_(True), self.preset.vlm_text_tokens))

    def vlm_score_capped(self, resolution: int, cap: int) -> C.FlopCount:
        """VLM on the image downscaled to ``cap`` px (the resize itself is not a counted op)."""
        side = min(resolution, cap)
        images = torch.empty(1, 3, side, side, device="meta")
        return _fb(lambda: C.vlm_score(self.vlm, images.requires_grad_(True), self.preset.vlm_text_tokens))


def _sum(*counts: C.FlopCount) -> dict[str, int]:
    fwd = sum(c.forward for c in counts)
    bwd = sum(c.backward for c in counts)
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def _fd(c: C.FlopCount | None) -> dict[str, Any] | None:
    return None if c is None else c.to_dict()


def run(
    preset_name: str = "full",
    resolutions: Sequence[int] = (512, 1024),
    t5_lengths: Sequence[int] = (128, 256),
    vlm_cap: int | None = VLM_CAPPED_RESOLUTION,
) -> dict[str, Any]:
    """Count everything; returns a JSON-serialisable dict."""
    import diffusers
    import transformers

    t0 = time.perf_counter()
    preset = C.get_preset(preset_name)
    with torch.random.fork_rng(devices=[]):  # from_config initialises the head on the CPU
        models = MetaModels(preset)
    result: dict[str, Any] = {
        "preset": preset_name,
        "description": preset.description,
        "units": "FLOPs (2 per multiply-accumulate), batch 1",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "date": datetime.date.today().isoformat(),
        "parameters": {
            "sd3_transformer": C.param_count(models.transformer),
            "reward_model_total": C.param_count(models.rm) if models.rm is not None else None,
            "reward_model_head": C.param_count(models.rm.reward_head) if models.rm is not None else None,
            "reward_model_lora": (
                sum(p.numel() for n, p in models.rm.named_parameters() if "lora_" in n) if models.rm is not None else None
            ),
            "policy_lora": sum(p.numel() for p in models.policy.parameters() if p.requires_grad),
            "vae_decoder": C.param_count(models.vae.decoder),
            "clip": C.param_count(models.clip),
            "vlm": C.param_count(models.vlm),
        },
        "configs": [],
    }
    pixel: dict[int, dict[str, Any]] = {}
    for res in resolutions:
        vae, clip, vlm = models.vae_decode(res), models.clip_score(res), models.vlm_score(res)
        pixel[res] = {
            "vae_decode": vae.to_dict(),
            "clip_h": clip.to_dict(),
            "vlm": vlm.to_dict(),
            "vlm_image_tokens": C.vlm_image_tokens(res),
            "pixel_clip": _sum(vae, clip),
            "pixel_vlm": _sum(vae, vlm),
        }
        if vlm_cap:
            capped = models.vlm_score_capped(res, vlm_cap)
            pixel[res]["vlm_capped"] = {**capped.to_dict(), "input_px": min(res, vlm_cap),
                                        "image_tokens": C.vlm_image_tokens(min(res, vlm_cap))}
            pixel[res]["pixel_vlm_capped"] = _sum(vae, capped)
    for res in resolutions:
        for t5 in t5_lengths:
            x = C.sd3_inputs(preset, res, t5)
            ours = models.project_reward(x)
            ref_u = models.reference_reward(x, merged=False)
            ref_m = models.reference_reward(x, merged=True)
            n_img = (res // preset.vae_factor // preset.transformer["patch_size"]) ** 2
            n_txt = C.text_tokens(t5)
            analytic_u = analytic_forward_flops(preset.transformer, preset.rm_model, n_img, n_txt, lora=True)
            analytic_m = analytic_forward_flops(preset.transformer, preset.rm_model, n_img, n_txt, lora=False)
            graded = models.policy_graded(x)
            reward = ours if ours is not None else ref_u
            entry: dict[str, Any] = {
                "resolution": res,
                "t5_length": t5,
                "image_tokens": n_img,
                "text_tokens": n_txt,
                "latent_reward": _fd(ours),
                "latent_reward_source": "project" if ours is not None else "reference (project model failed on meta)",
                "reference_unmerged_lora": ref_u.to_dict(),
                "reference_merged_lora": ref_m.to_dict(),
                "analytic_forward": {"unmerged_lora": analytic_u, "merged_lora": analytic_m},
                "policy_forward": graded.forward,
                "policy_graded_fwd_bwd": graded.to_dict(),
                **pixel[res],
            }
            entry["overhead"] = {
                "forward_vs_minimum_unmerged": reward.forward / ref_u.forward - 1,
                "fwd_bwd_vs_minimum_unmerged": reward.total / ref_u.total - 1,
                "forward_vs_minimum_merged": reward.forward / ref_m.forward - 1,
                "fwd_bwd_vs_minimum_merged": reward.total / ref_m.total - 1,
            }
            entry["ratios"] = {
                "fwd_ours_over_pixel_clip": reward.forward / pixel[res]["pixel_clip"]["forward"],
                "fwd_ours_over_pixel_vlm": reward.forward / pixel[res]["pixel_vlm"]["forward"],
                "fwd_bwd_ours_over_pixel_clip": reward.total / pixel[res]["pixel_clip"]["total"],
                "fwd_bwd_ours_over_pixel_vlm": reward.total / pixel[res]["pixel_vlm"]["total"],
            }
            entry["refl"] = refl_breakdown(entry, reward.total)
            result["configs"].append(entry)
    result["meta_device"] = {
        "project_model_counted": models.rm is not None,
        "needed_workaround": models.rm_meta_workaround,
        "error": models.rm_error,
    }
    result["paper_comparison"] = paper_comparison(result)
    result["wall_s"] = time.perf_counter() - t0
    return result


def refl_breakdown(entry: dict[str, Any], latent_reward_fwd_bwd: int) -> list[dict[str, Any]]:
    """Per graded sample: rollout, graded step, reward, update (= graded + reward), total."""
    rewards = {
        "ours": latent_reward_fwd_bwd,
        "pixel_clip": entry["pixel_clip"]["total"],
        "pixel_vlm": entry["pixel_vlm"]["total"],
    }
    graded = entry["policy_graded_fwd_bwd"]["total"]
    out = []
    for sc in SCENARIOS:
        rollout = sc.rollout_forwards * entry["policy_forward"]
        row: dict[str, Any] = {
            "scenario": sc.name,
            "cfg": sc.cfg,
            "graded_per_rollout": sc.graded_per_rollout,
            "rollout_steps": sc.rollout_steps,
            "rollout": rollout,
            "graded_step": graded,
        }
        for name, rew in rewards.items():
            row[f"reward_{name}"] = rew
            row[f"update_{name}"] = graded + rew
            row[f"total_{name}"] = rollout + graded + rew
        for base in ("pixel_clip", "pixel_vlm"):
            row[f"total_ratio_ours_over_{base}"] = row["total_ours"] / row[f"total_{base}"]
            row[f"update_ratio_ours_over_{base}"] = row["update_ours"] / row[f"update_{base}"]
        out.append(row)
    return out


def paper_comparison(result: dict[str, Any]) -> dict[str, Any]:
    """Our reductions vs the paper's -71.1 % (reward) and -46.4 % (update), per resolution (T5 128 first)."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for e in result["configs"]:
        if e["resolution"] in seen:
            continue
        seen.add(e["resolution"])
        paper_row = e["refl"][0]
        ours_fwd = (e["latent_reward"] or e["reference_unmerged_lora"])["forward"]
        graded = paper_row["graded_step"]
        # The figure has separate "reward" and "update" bars: read as reward = forward, update =
        # graded step fwd+bwd + the reward's backward.
        upd_ours = graded + paper_row["reward_ours"] - ours_fwd
        upd_vlm = graded + e["pixel_vlm"]["backward"]
        out[str(e["resolution"])] = {
            "t5_length": e["t5_length"],
            "reward_fwd_reduction_pct": 100 * (1 - ours_fwd / e["pixel_vlm"]["forward"]),
            "reward_fwd_bwd_reduction_pct": 100 * (1 - paper_row["reward_ours"] / paper_row["reward_pixel_vlm"]),
            "update_reduction_pct": 100 * (1 - paper_row["update_ours"] / paper_row["update_pixel_vlm"]),
            "total_reduction_pct": 100 * (1 - paper_row["total_ours"] / paper_row["total_pixel_vlm"]),
            "update_split_reduction_pct": 100 * (1 - upd_ours / upd_vlm),
            "tmacs": {
                "update_split_ours": upd_ours / 2e12,
                "update_split_pixel_vlm": upd_vlm / 2e12,
                "reward_fwd_ours": ours_fwd / 2e12,
                "reward_fwd_pixel_vlm": e["pixel_vlm"]["forward"] / 2e12,
                "reward_fwd_bwd_ours": paper_row["reward_ours"] / 2e12,
                "reward_fwd_bwd_pixel_vlm": paper_row["reward_pixel_vlm"] / 2e12,
                "update_ours": paper_row["update_ours"] / 2e12,
                "update_pixel_vlm": paper_row["update_pixel_vlm"] / 2e12,
                "rollout_cfg_mean_k": paper_row["rollout"] / 2e12,
                "rollout_no_cfg_mean_k": e["refl"][1]["rollout"] / 2e12,
                "rollout_no_cfg_40_steps": 40 * e["policy_forward"] / 2e12,
            },
        }
        if "pixel_vlm_capped" in e:
            cap = e["pixel_vlm_capped"]
            out[str(e["resolution"])]["vlm_capped"] = {
                "input_px": e["vlm_capped"]["input_px"],
                "reward_fwd_reduction_pct": 100 * (1 - ours_fwd / cap["forward"]),
                "update_split_reduction_pct": 100 * (1 - upd_ours / (graded + cap["backward"])),
                "reward_fwd_tmacs": cap["forward"] / 2e12,
                "update_split_tmacs": (graded + cap["backward"]) / 2e12,
            }
    return out


# ------------------------------------------------------------------------------------------ output


def _t(x: float) -> str:
    return C.tflops(x)


def markdown(r: dict[str, Any]) -> str:
    """The full markdown report of a run."""
    cfgs = r["configs"]
    lines: list[str] = []
    lines.append(
        f"Preset `{r['preset']}` ({r['description']}); {r['units']}; counted with `FlopCounterMode` on the meta "
        f"device (torch {r['versions']['torch']}, diffusers {r['versions']['diffusers']}, transformers "
        f"{r['versions']['transformers']})."
    )
    lines += ["", "**Reward cost (TFLOPs) and ratios.** Pixel rewards = SD3.5 VAE decode + scorer; the latent reward "
              "needs no decode. `fwd+bwd` = forward + backward to the latents with frozen weights (ReFL).", ""]
    rows = []
    for e in cfgs:
        ours = e["latent_reward"] or e["reference_unmerged_lora"]
        rows.append([
            f"{e['resolution']}, T5 {e['t5_length']}",
            f"{_t(ours['forward'])} / {_t(ours['total'])}",
            f"{_t(e['pixel_clip']['forward'])} / {_t(e['pixel_clip']['total'])}",
            f"{_t(e['pixel_vlm']['forward'])} / {_t(e['pixel_vlm']['total'])}",
            f"{e['ratios']['fwd_ours_over_pixel_clip']:.3f} / {e['ratios']['fwd_bwd_ours_over_pixel_clip']:.3f}",
            f"{e['ratios']['fwd_ours_over_pixel_vlm']:.3f} / {e['ratios']['fwd_bwd_ours_over_pixel_vlm']:.3f}",
        ])
    lines.append(C.md_table(
        ["resolution", "DiNa-LRM fwd / fwd+bwd", "VAE+CLIP-H fwd / fwd+bwd", "VAE+Qwen2-VL-7B fwd / fwd+bwd",
         "ours / pixel+CLIP (fwd / fwd+bwd)", "ours / pixel+VLM (fwd / fwd+bwd)"],
        rows,
    ))
    lines += ["", "**Components** (TFLOPs, fwd / fwd+bwd; the pixel scorers do not depend on the T5 length):", ""]
    rows = []
    seen: set[int] = set()
    for e in cfgs:
        if e["resolution"] in seen:
            continue
        seen.add(e["resolution"])
        rows.append([
            e["resolution"],
            f"{_t(e['vae_decode']['forward'])} / {_t(e['vae_decode']['total'])}",
            f"{_t(e['clip_h']['forward'])} / {_t(e['clip_h']['total'])}",
            f"{_t(e['vlm']['forward'])} / {_t(e['vlm']['total'])} ({e['vlm_image_tokens']} image tokens)",
            f"{_t(e['policy_forward'])} / {_t(e['policy_graded_fwd_bwd']['total'])} (T5 {e['t5_length']})",
        ])
    lines.append(C.md_table(
        ["resolution", "SD3.5 VAE decode", "CLIP ViT-H/14 (224 px)", "Qwen2-VL-7B", "SD3.5-M policy (LoRA r32) fwd / graded fwd+bwd"],
        rows,
    ))
    lines += ["", "**DiNa-LRM implementation vs the architecture minimum** (12 blocks + head; reference re-implementation "
              "and closed form):", ""]
    rows = []
    for e in cfgs:
        ours = e["latent_reward"]
        ru, rm_ = e["reference_unmerged_lora"], e["reference_merged_lora"]
        rows.append([
            f"{e['resolution']}, T5 {e['t5_length']}",
            f"{_t(ours['forward'])} / {_t(ours['total'])}" if ours else "n/a",
            f"{_t(ru['forward'])} / {_t(ru['total'])}",
            _t(e["analytic_forward"]["unmerged_lora"]["total"]),
            f"{_t(rm_['forward'])} / {_t(rm_['total'])}",
            f"{100 * e['overhead']['forward_vs_minimum_unmerged']:+.2f} % / {100 * e['overhead']['fwd_bwd_vs_minimum_unmerged']:+.2f} %",
            f"{100 * e['overhead']['forward_vs_minimum_merged']:+.2f} % / {100 * e['overhead']['fwd_bwd_vs_minimum_merged']:+.2f} %",
        ])
    lines.append(C.md_table(
        ["resolution", "project fwd / fwd+bwd", "minimum, LoRA unmerged", "closed form fwd", "minimum, LoRA merged",
         "overhead vs unmerged", "overhead vs merged"],
        rows,
    ))
    md = r["meta_device"]
    if md["needed_workaround"] or not md["project_model_counted"]:
        lines += ["", f"Meta device: {md['error']}"
                  + (" -- counted with `validation.check_finite` skipped for meta tensors." if md["needed_workaround"] else "")]
    first = {}
    for e in cfgs:
        first.setdefault(e["resolution"], e)
    for res, e in first.items():
        lines += ["", f"**ReFL update per graded sample, {res}x{res}, T5 {e['t5_length']}** (TFLOPs; k uniform in "
                  f"[{K_LOW}, {K_HIGH}] of 40 steps; graded = policy fwd+bwd into its LoRA; update = graded + reward "
                  "fwd+bwd; G graded steps share one rollout that runs to the largest of their k):", ""]
        rows = []
        for row in e["refl"]:
            rows.append([
                row["scenario"],
                f"{row['rollout_steps']:.2f}",
                _t(row["rollout"]),
                _t(row["graded_step"]),
                f"{_t(row['reward_ours'])} / {_t(row['reward_pixel_clip'])} / {_t(row['reward_pixel_vlm'])}",
                f"{_t(row['update_ours'])} / {_t(row['update_pixel_clip'])} / {_t(row['update_pixel_vlm'])}",
                f"{_t(row['total_ours'])} / {_t(row['total_pixel_clip'])} / {_t(row['total_pixel_vlm'])}",
                f"{row['update_ratio_ours_over_pixel_clip']:.3f} / {row['update_ratio_ours_over_pixel_vlm']:.3f}",
                f"{row['total_ratio_ours_over_pixel_clip']:.3f} / {row['total_ratio_ours_over_pixel_vlm']:.3f}",
            ])
        lines.append(C.md_table(
            ["scenario", "rollout steps", "rollout", "graded step", "reward ours / CLIP / VLM",
             "update ours / CLIP / VLM", "total ours / CLIP / VLM", "update ratio vs CLIP / VLM",
             "total ratio vs CLIP / VLM"],
            rows,
        ))
    lines += ["", "**Against the paper** (ReFL figure: reward -71.1 %, update -46.4 % vs HPSv3; bars ~3 vs ~11 "
              "(reward), ~18.5 vs ~34.5 (update), ~209 (sampling), labelled TFLOPs). Ours vs pixel + Qwen2-VL-7B. "
              "'update' = graded step fwd+bwd + reward fwd+bwd; 'split update' = graded step fwd+bwd + reward backward "
              "only (the reward forward sits in the figure's separate reward bar). Absolute values in "
              "multiply-accumulates (TMACs = TFLOPs / 2):", ""]
    rows = []
    for res, p in r["paper_comparison"].items():
        m = p["tmacs"]
        rows.append([
            f"{res}, T5 {p['t5_length']}",
            f"{p['reward_fwd_reduction_pct']:.1f} % / {p['reward_fwd_bwd_reduction_pct']:.1f} %",
            f"{p['update_reduction_pct']:.1f} % / {p['update_split_reduction_pct']:.1f} %",
            f"{m['reward_fwd_ours']:.2f} vs {m['reward_fwd_pixel_vlm']:.2f}",
            f"{m['update_split_ours']:.2f} vs {m['update_split_pixel_vlm']:.2f}",
            f"{m['rollout_cfg_mean_k']:.0f} / {m['rollout_no_cfg_mean_k']:.0f} / {m['rollout_no_cfg_40_steps']:.0f}",
        ])
    lines.append(C.md_table(
        ["resolution", "reward reduction fwd / fwd+bwd", "update reduction / split update reduction",
         "reward fwd TMACs ours vs VLM", "split update TMACs ours vs VLM",
         "rollout TMACs: CFG mean k / no-CFG mean k / no-CFG 40 steps"],
        rows,
    ))
    capped = [(res, p["vlm_capped"]) for res, p in r["paper_comparison"].items() if "vlm_capped" in p]
    if capped:
        lines += ["", "Sensitivity, VLM fed a downscaled image (the resize is free; VAE decode still at full "
                  "resolution): " + "; ".join(
                      f"{res}: VLM input {c['input_px']} px, reward fwd {c['reward_fwd_tmacs']:.2f} TMACs "
                      f"(ours -{c['reward_fwd_reduction_pct']:.1f} %), split update {c['update_split_tmacs']:.2f} TMACs "
                      f"(ours -{c['update_split_reduction_pct']:.1f} %)" for res, c in capped) + "."]
    p = r["parameters"]
    lines += ["", "Parameters: " + ", ".join(
        f"{k} {v / 1e6:.1f} M" for k, v in p.items() if v is not None
    ) + f". Counting took {r['wall_s']:.0f} s."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full", choices=["full", "small", "tiny"])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--t5-lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--vlm-cap", type=int, default=VLM_CAPPED_RESOLUTION,
                        help="also count the VLM on images downscaled to this side (0: skip)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--update-doc", type=Path, default=None, help="replace the flops section of this doc")
    args = parser.parse_args(argv)
    result = run(args.preset, args.resolutions, args.t5_lengths, vlm_cap=args.vlm_cap or None)
    result["command"] = "python -m benchmarks.flops " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result)
    print(text)
    C.write_json(args.json, result)
    print(f"\nJSON: {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.update_doc:
        C.replace_doc_section(args.update_doc, "flops", text)
    return result


if __name__ == "__main__":
    main()
