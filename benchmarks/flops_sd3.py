"""The SD3.5-Medium rows of the FLOP benchmark, and the comparison with the paper's ReFL figure.

Per resolution and T5 length: DiNa-LRM (the project's model, the reference minimum with the reward LoRA
unmerged / merged, the closed form), the pixel rewards (SD3.5 VAE decode + CLIP-H / + Qwen2-VL-7B), the
SD3.5-M policy step (LoRA r 32) and the ReFL cost per graded sample for the paper's recipe and the
cheaper options (no-CFG rollout, several graded steps per rollout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import common as C
from benchmarks.flops_rows import (
    K_HIGH,
    K_LOW,
    PixelRewards,
    Scenario,
    backbone_rows,
    fwd_bwd,
    refl_breakdown,
    row_count,
)
from benchmarks.reference import ReferenceLatentReward, analytic_forward_flops

#: The paper's ReFL figure (SD3.5-M, DiNa-LRM vs HPSv3): bars read off the figure, labelled TFLOPs.
PAPER = {
    "sampling": {"ours": 209.0, "hpsv3": 209.0},
    "reward": {"ours": 3.0, "hpsv3": 11.0, "reduction_pct": 71.1},
    "update": {"ours": 18.5, "hpsv3": 34.5, "reduction_pct": 46.4},
    "total": {"ours": 231.0, "hpsv3": 255.0},
}

#: Sensitivity row: the VLM fed a downscaled image (448 px -> 256 image tokens), a common reward-model
#: pixel budget (256 x 28 x 28). The main comparison uses the image tokens at full resolution.
VLM_CAPPED_RESOLUTION = 448

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("paper recipe: CFG rollout, 1 graded step per rollout", True, 1, K_LOW, K_HIGH),
    Scenario("no-CFG rollout, 1 graded step per rollout", False, 1, K_LOW, K_HIGH),
    Scenario("CFG rollout, 4 graded steps per rollout", True, 4, K_LOW, K_HIGH),
    Scenario("no-CFG rollout, 4 graded steps per rollout", False, 4, K_LOW, K_HIGH),
)


class MetaModels:
    """Every SD3.5 model of a preset (and the pixel scorers), built once on the meta device."""

    def __init__(self, preset: C.Preset) -> None:
        self.preset = preset
        self.transformer = C.build_transformer(preset)
        self.ref_unmerged = ReferenceLatentReward(self.transformer, preset.rm_model, lora="unmerged")
        self.ref_merged = ReferenceLatentReward(self.transformer, preset.rm_model, lora="merged")
        self.policy = C.build_transformer(preset)
        C.add_policy_lora(self.policy, preset)
        self.vae = C.build_vae(preset)
        self.pixel = PixelRewards(preset, self.vae)
        self.clip, self.vlm = self.pixel.clip, self.pixel.vlm

    def sd3_reward_model(self) -> torch.nn.Module:
        """The project's SD3.5 reward model of the preset on the meta device (a model builder)."""
        return C.build_reward_model(self.preset, self.transformer, device="meta")

    def sd3_inputs(self, resolution: int, t5_length: int) -> dict[str, Any]:
        return C.sd3_inputs(self.preset, resolution, t5_length)

    def reference_reward(self, x: dict[str, torch.Tensor], merged: bool) -> C.FlopCount:
        ref = self.ref_merged if merged else self.ref_unmerged
        return fwd_bwd(lambda: ref.score(x["latents"].detach().requires_grad_(True), x["noise"], x["prompt_embeds"],
                                         x["pooled_prompt_embeds"], 0.4))

    def policy_graded(self, x: dict[str, torch.Tensor]) -> C.FlopCount:
        """Graded step: LoRA policy forward with grad, backward into the LoRA (z_k needs no grad)."""
        return fwd_bwd(lambda: C.transformer_velocity(self.policy, x["latents"], x["prompt_embeds"],
                                                      x["pooled_prompt_embeds"], 0.2))


def overhead(reward: C.FlopCount, ref_u: C.FlopCount, ref_m: C.FlopCount) -> dict[str, float]:
    """Relative extra FLOPs of the project's reward over the minimum (LoRA unmerged / merged)."""
    return {
        "forward_vs_minimum_unmerged": reward.forward / ref_u.forward - 1,
        "fwd_bwd_vs_minimum_unmerged": reward.total / ref_u.total - 1,
        "forward_vs_minimum_merged": reward.forward / ref_m.forward - 1,
        "fwd_bwd_vs_minimum_merged": reward.total / ref_m.total - 1,
    }


def ratios(reward: C.FlopCount, pixel: dict[str, Any]) -> dict[str, float]:
    """The latent reward over each pixel reward, forward and forward + backward."""
    return {
        "fwd_ours_over_pixel_clip": reward.forward / pixel["pixel_clip"]["forward"],
        "fwd_ours_over_pixel_vlm": reward.forward / pixel["pixel_vlm"]["forward"],
        "fwd_bwd_ours_over_pixel_clip": reward.total / pixel["pixel_clip"]["total"],
        "fwd_bwd_ours_over_pixel_vlm": reward.total / pixel["pixel_vlm"]["total"],
    }


def sd3_part(
    preset: C.Preset, resolutions: Sequence[int], t5_lengths: Sequence[int], vlm_cap: int | None
) -> dict[str, Any]:
    """``{"parameters", "configs", "meta_device", "scorers", "pixel"}``: the SD3.5 rows; ``scorers`` (the CLIP /
    VLM counts per resolution) and ``pixel`` (the meta models) are reused by the other backbones, whose pixel
    rewards differ only in the VAE. Only the first three are JSON."""
    models = MetaModels(preset)
    sd3 = backbone_rows(models.sd3_reward_model, models.sd3_inputs, resolutions, t5_lengths)
    parameters = {
        "sd3_transformer": C.param_count(models.transformer),
        **sd3["parameters"],
        "policy_lora": sum(p.numel() for p in models.policy.parameters() if p.requires_grad),
        "vae_decoder": C.param_count(models.vae.decoder),
        "clip": C.param_count(models.clip),
        "vlm": C.param_count(models.vlm),
    }
    pixel = {res: models.pixel.components(res, vlm_cap) for res in resolutions}
    scorers = {res: {k: C.FlopCount(**{f: p[k][f] for f in ("forward", "backward", "by_op")})
                     for k in ("clip_h", "vlm")} for res, p in pixel.items()}
    configs = []
    rows = iter(sd3["rows"])
    for res in resolutions:
        for t5 in t5_lengths:
            x = C.sd3_inputs(preset, res, t5)
            row = next(rows)
            ours = row_count(row)
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
                "latent_reward": None if ours is None else ours.to_dict(),
                "latent_reward_source": "project" if ours is not None else "reference (project model failed on meta)",
                "latent_reward_output_layers_forward": row["output_layers_forward"],
                "reference_unmerged_lora": ref_u.to_dict(),
                "reference_merged_lora": ref_m.to_dict(),
                "analytic_forward": {"unmerged_lora": analytic_u, "merged_lora": analytic_m},
                "policy_forward": graded.forward,
                "policy_graded_fwd_bwd": graded.to_dict(),
                **pixel[res],
            }
            entry["overhead"] = overhead(reward, ref_u, ref_m)
            entry["ratios"] = ratios(reward, pixel[res])
            entry["refl"] = refl_breakdown(entry, reward.total, SCENARIOS)
            configs.append(entry)
    return {"parameters": parameters, "configs": configs, "meta_device": sd3["meta_device"], "scorers": scorers,
            "pixel": models.pixel}


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
