"""The FLUX.1-dev and Z-Image-Turbo rows of the FLOP benchmark (meta device).

Per family, resolution and text length: the project's reward model (its upstream configuration) forward
and forward + backward to the latents; the architecture minimum (``benchmarks.reference_families``:
a compact re-implementation with the reward LoRA unmerged / merged, and the closed form); the pixel
rewards with the family's VAE (the FLUX AE) + CLIP-H / + Qwen2-VL-7B; the policy (LoRA r 32 on the
adapter's default targets) forward and graded step; and the ReFL cost per graded sample without CFG
(FLUX.1-dev is guidance-distilled, Z-Image-Turbo samples without CFG) for 1, 2 and 4 graded steps per
rollout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import common as C
from benchmarks import families as fams
from benchmarks.flops_rows import PixelRewards, Scenario, backbone_rows, fwd_bwd, refl_breakdown, row_count
from benchmarks.flops_sd3 import overhead, ratios
from benchmarks.reference_families import (
    ReferenceFluxReward,
    ReferenceZImageReward,
    analytic_flux_forward_flops,
    analytic_zimage_forward_flops,
)

#: Graded steps per rollout counted for the families (bounded by the size of their k window).
GRADED_PER_ROLLOUT: tuple[int, ...] = (1, 2, 4)


def scenarios(family: fams.Family) -> tuple[Scenario, ...]:
    """No-CFG rollouts with 1, 2 and 4 graded steps per rollout, k uniform in the family's window."""
    window = family.k_high - family.k_low + 1
    return tuple(
        Scenario(f"no-CFG rollout, {g} graded step{'s' if g > 1 else ''} per rollout", False, g, family.k_low,
                 family.k_high)
        for g in GRADED_PER_ROLLOUT if g <= window
    )


def amortisation_for(entry: dict[str, Any], family: fams.Family, target: float = 0.5,
                     max_graded: int = 16) -> dict[str, Any]:
    """The fewest graded steps per rollout ``G`` at which a graded sample with DiNa-LRM costs at most ``target``
    x one with the VLM reward and one graded step per rollout (the rollout runs to ``k_high``; ``G`` distinct k
    need the window ``[k_high - G + 1, k_high]``). ``graded_per_rollout`` None: not reachable (k >= 1)."""
    vlm_g1 = entry["refl"][0]["total_pixel_vlm"]
    update = entry["refl"][0]["update_ours"]
    out: dict[str, Any] = {"target": target, "versus": "pixel_vlm, 1 graded step per rollout", "rollout_steps":
                           family.k_high, "graded_per_rollout": None, "ratio": None, "k_window": None}
    for g in range(1, min(max_graded, family.k_high) + 1):
        total = family.k_high * entry["policy_forward"] / g + update
        if total <= target * vlm_g1:
            out.update(graded_per_rollout=g, ratio=total / vlm_g1, k_window=[family.k_high - g + 1, family.k_high])
            break
    out["floor_same_recipe"] = entry["refl"][0]["update_ratio_ours_over_pixel_vlm"]
    return out


class FamilyModels:
    """One family's transformer, policy, references and VAE on the meta device (built once)."""

    def __init__(self, family: fams.Family) -> None:
        self.family = family
        self.transformer = fams.build_transformer(family)
        ref = ReferenceFluxReward if family.name == "flux" else ReferenceZImageReward
        self.ref_unmerged = ref(self.transformer, family.reward_model, lora="unmerged")
        self.ref_merged = ref(self.transformer, family.reward_model, lora="merged")
        self.policy = fams.build_transformer(family)
        self.policy_lora = fams.add_policy_lora(self.policy, family)
        self.vae = fams.build_vae(family)

    def reward_model(self) -> torch.nn.Module:
        return fams.build_reward_model(self.family, self.transformer, device="meta")

    def inputs(self, resolution: int, text_length: int) -> dict[str, Any]:
        return fams.inputs(self.family, resolution, text_length)

    def reference(self, x: dict[str, Any], merged: bool) -> C.FlopCount:
        ref = self.ref_merged if merged else self.ref_unmerged
        z = x["latents"].detach().requires_grad_(True)
        if self.family.name == "flux":
            return fwd_bwd(lambda: ref.score(z, x["noise"], x["prompt_embeds"], x["pooled_prompt_embeds"], 0.4,
                                             self.family.embedded_guidance))
        return fwd_bwd(lambda: ref.score(z, x["noise"], x["prompt_embeds"], 0.4))

    def analytic(self, resolution: int, text_length: int, lora: bool) -> dict[str, int]:
        n = (resolution // self.family.preset.vae_factor // 2) ** 2
        fn = analytic_flux_forward_flops if self.family.name == "flux" else analytic_zimage_forward_flops
        return fn(self.family.transformer, self.family.reward_model, n, text_length, lora=lora)

    def policy_graded(self, x: dict[str, Any]) -> C.FlopCount:
        """Graded step: LoRA policy forward with grad, backward into the LoRA (z_k needs no grad)."""
        return fwd_bwd(lambda: fams.velocity(self.family, self.policy, x["latents"], 0.2, x["prompt_embeds"],
                                          x["pooled_prompt_embeds"]))


def family_part(
    name: str,
    preset_name: str,
    resolutions: Sequence[int],
    text_lengths: Sequence[int],
    pixel: PixelRewards | None = None,
    scorers: dict[int, dict[str, C.FlopCount]] | None = None,
) -> dict[str, Any]:
    """All rows of one family (JSON-serialisable). ``pixel``: CLIP / VLM models to reuse (the VAE is the
    family's own); ``scorers``: CLIP / VLM counts already made per resolution."""
    family = fams.get_family(name, preset_name)
    models = FamilyModels(family)
    if pixel is None:
        pixel = PixelRewards(family.preset, models.vae)
    else:
        pixel = PixelRewards(family.preset, models.vae, clip=pixel.clip, vlm=pixel.vlm)
    rows = backbone_rows(models.reward_model, models.inputs, resolutions, text_lengths)
    scs = scenarios(family)
    configs = []
    components = {res: pixel.components(res, None, (scorers or {}).get(res)) for res in resolutions}
    it = iter(rows["rows"])
    for res in resolutions:
        for length in text_lengths:
            row = next(it)
            x = models.inputs(res, length)
            ours = row_count(row)
            ref_u, ref_m = models.reference(x, merged=False), models.reference(x, merged=True)
            graded = models.policy_graded(x)
            reward = ours if ours is not None else ref_u
            n_seq, m_seq = fams.sequence_tokens(family, res, length)
            entry: dict[str, Any] = {
                "resolution": res,
                "text_length": length,
                "image_tokens": row["image_tokens"],
                "sequence_tokens": {"image": n_seq, "text": m_seq},
                "latent_reward": None if ours is None else ours.to_dict(),
                "latent_reward_output_layers_forward": row["output_layers_forward"],
                "reference_unmerged_lora": ref_u.to_dict(),
                "reference_merged_lora": ref_m.to_dict(),
                "analytic_forward": {"unmerged_lora": models.analytic(res, length, True),
                                     "merged_lora": models.analytic(res, length, False)},
                "policy_forward": graded.forward,
                "policy_graded_fwd_bwd": graded.to_dict(),
                **components[res],
            }
            entry["overhead"] = overhead(reward, ref_u, ref_m)
            entry["ratios"] = ratios(reward, components[res])
            refl = refl_breakdown(entry, reward.total, scs)
            vlm_g1 = refl[0]["total_pixel_vlm"]
            for r in refl:  # ours with this amortisation vs the VLM reward with one graded step per rollout
                r["total_ratio_ours_over_pixel_vlm_g1"] = r["total_ours"] / vlm_g1
            entry["refl"] = refl
            entry["half_vlm_cost"] = amortisation_for(entry, family)
            entry["reward_share_of_update"] = {k: refl[0][f"reward_{k}"] / refl[0][f"update_{k}"]
                                               for k in ("ours", "pixel_clip", "pixel_vlm")}
            configs.append(entry)
    return {
        "name": family.name,
        "label": family.label,
        "reward_config": family.reward_model,
        "sampling": {"num_steps": family.num_steps, "cfg": False, "k_low": family.k_low, "k_high": family.k_high,
                     "embedded_guidance": family.embedded_guidance, "policy_lora_r": family.policy_lora_r},
        "parameters": {
            "transformer": C.param_count(models.transformer),
            **rows["parameters"],
            "policy_lora": sum(p.numel() for p in models.policy_lora),
            "vae_decoder": C.param_count(models.vae.decoder),
        },
        "meta_device": rows["meta_device"],
        "configs": configs,
    }
