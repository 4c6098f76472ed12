"""Markdown report of the FLOP benchmark: the SD3.5 tables, the FLUX.1-dev / Z-Image-Turbo tables, and the
doc sections they replace (``<!-- flops:... -->`` and ``<!-- flops-families:... -->``)."""

from __future__ import annotations

from typing import Any

from benchmarks.flops_rows import K_HIGH, K_LOW
from benchmarks.output import md_table, tflops


def _t(x: float) -> str:
    return tflops(x)


def _pair(c: dict[str, Any]) -> str:
    return f"{_t(c['forward'])} / {_t(c['total'])}"


def _pct(x: float) -> str:
    return f"{100 * x:+.2f} %"


def sd3_markdown(r: dict[str, Any]) -> list[str]:
    """The SD3.5 part of the report (lines)."""
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
    lines.append(md_table(
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
    lines.append(md_table(
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
            "n/a" if e["latent_reward_output_layers_forward"] is None
            else f"{e['latent_reward_output_layers_forward'] / 1e9:.3f}",
        ])
    lines.append(md_table(
        ["resolution", "project fwd / fwd+bwd", "minimum, LoRA unmerged", "closed form fwd", "minimum, LoRA merged",
         "overhead vs unmerged", "overhead vs merged", "of which unread output layers, fwd GFLOPs"],
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
        lines.append(md_table(
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
    lines.append(md_table(
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
    return lines


def families_markdown(r: dict[str, Any]) -> list[str]:
    """The FLUX.1-dev / Z-Image-Turbo part of the report (lines; empty without families)."""
    fams = list(r.get("families", {}).values())
    if not fams:
        return []
    length = fams[0]["configs"][0]["text_length"]
    lines = [f"**FLUX.1-dev and Z-Image-Turbo: reward cost (TFLOPs) and ratios**, text {length} tokens (FLUX: T5; "
             "Z-Image: Qwen3 chat-templated caption), the families' upstream reward configs. Pixel rewards = FLUX AE "
             "decode + scorer (Z-Image decodes with the FLUX AE too).", ""]
    rows = []
    for f in fams:
        for e in f["configs"]:
            ours = e["latent_reward"] or e["reference_unmerged_lora"]
            q = e["ratios"]
            rows.append([f["label"], e["resolution"], _pair(ours), _pair(e["pixel_clip"]), _pair(e["pixel_vlm"]),
                         f"{q['fwd_ours_over_pixel_clip']:.3f} / {q['fwd_bwd_ours_over_pixel_clip']:.3f}",
                         f"{q['fwd_ours_over_pixel_vlm']:.3f} / {q['fwd_bwd_ours_over_pixel_vlm']:.3f}"])
    lines.append(md_table(["policy", "resolution", "DiNa-LRM fwd / fwd+bwd", "VAE+CLIP-H fwd / fwd+bwd",
                           "VAE+Qwen2-VL-7B fwd / fwd+bwd", "ours / pixel+CLIP (fwd / fwd+bwd)",
                           "ours / pixel+VLM (fwd / fwd+bwd)"], rows))
    lines += ["", "**Implementation vs the architecture minimum** (kept blocks + embedders + reward LoRA + head; "
              "reference re-implementation and closed form; fwd / fwd+bwd):", ""]
    rows = []
    for f in fams:
        for e in f["configs"]:
            ours, o = e["latent_reward"], e["overhead"]
            rows.append([f["label"], e["resolution"], _pair(ours) if ours else "n/a", _pair(e["reference_unmerged_lora"]),
                         _t(e["analytic_forward"]["unmerged_lora"]["total"]), _pair(e["reference_merged_lora"]),
                         f"{_pct(o['forward_vs_minimum_unmerged'])} / {_pct(o['fwd_bwd_vs_minimum_unmerged'])}",
                         f"{_pct(o['forward_vs_minimum_merged'])} / {_pct(o['fwd_bwd_vs_minimum_merged'])}"])
    lines.append(md_table(["policy", "resolution", "project", "minimum, LoRA unmerged", "closed form fwd",
                           "minimum, LoRA merged", "overhead vs unmerged", "overhead vs merged"], rows))
    lines += ["", "**Components** (TFLOPs; policy LoRA r 32 on the adapter's default targets; graded = policy fwd+bwd "
              "into its LoRA; share = reward fwd+bwd / (graded step + reward fwd+bwd)):", ""]
    rows = []
    for f in fams:
        for e in f["configs"]:
            s = e["reward_share_of_update"]
            rows.append([f["label"], e["resolution"], _t(e["policy_forward"]), _t(e["policy_graded_fwd_bwd"]["total"]),
                         _pair(e["vae_decode"]), f"{s['ours']:.2f} / {s['pixel_clip']:.2f} / {s['pixel_vlm']:.2f}"])
    lines.append(md_table(["policy", "resolution", "policy fwd", "graded step fwd+bwd", "FLUX AE decode fwd / fwd+bwd",
                           "reward share of the update: ours / CLIP / VLM"], rows))
    for f in fams:
        s = f["sampling"]
        for e in f["configs"]:
            lines += ["", f"**ReFL per graded sample, {f['label']}, {e['resolution']}x{e['resolution']}** (TFLOPs; "
                      f"{s['num_steps']} steps, no CFG, k uniform in [{s['k_low']}, {s['k_high']}]; G graded steps share "
                      "one rollout that runs to the largest of their k; last column: ours with this G vs the VLM "
                      "reward with G = 1):", ""]
            rows = []
            for row in e["refl"]:
                rows.append([
                    row["graded_per_rollout"], f"{row['rollout_steps']:.2f}", _t(row["rollout"]), _t(row["graded_step"]),
                    f"{_t(row['reward_ours'])} / {_t(row['reward_pixel_clip'])} / {_t(row['reward_pixel_vlm'])}",
                    f"{_t(row['total_ours'])} / {_t(row['total_pixel_clip'])} / {_t(row['total_pixel_vlm'])}",
                    f"{row['update_ratio_ours_over_pixel_clip']:.3f} / {row['update_ratio_ours_over_pixel_vlm']:.3f}",
                    f"{row['total_ratio_ours_over_pixel_clip']:.3f} / {row['total_ratio_ours_over_pixel_vlm']:.3f}",
                    f"{row['total_ratio_ours_over_pixel_vlm_g1']:.3f}",
                ])
            lines.append(md_table(["G", "rollout steps", "rollout", "graded step", "reward ours / CLIP / VLM",
                                   "total ours / CLIP / VLM", "update ratio vs CLIP / VLM", "total ratio vs CLIP / VLM",
                                   "total ours (G) / VLM (G = 1)"], rows))
            h = e["half_vlm_cost"]
            if h["graded_per_rollout"] is None:
                lines += ["", f"Half the VLM reward's cost (G = 1) is out of reach with rollouts to k = {h['rollout_steps']}."]
            else:
                lines += ["", f"Half the VLM reward's cost (G = 1) takes G = {h['graded_per_rollout']} graded steps per "
                          f"rollout to k = {h['rollout_steps']} (k window [{h['k_window'][0]}, {h['k_window'][1]}]): "
                          f"ratio {h['ratio']:.3f}. With the same G on both sides the ratio cannot drop below the "
                          f"update ratio, {h['floor_same_recipe']:.3f}."]
    sd3 = {e["resolution"]: e for e in reversed(r.get("configs", []))}  # first text length per resolution
    summary = []
    for res in sorted({e["resolution"] for f in fams for e in f["configs"]}):
        parts = [f"SD3.5-M {sd3[res]['refl'][0]['update_ratio_ours_over_pixel_vlm']:.2f}"] if res in sd3 else []
        parts += [f"{f['label']} {e['refl'][0]['update_ratio_ours_over_pixel_vlm']:.2f}"
                  for f in fams for e in f["configs"] if e["resolution"] == res]
        summary.append(f"{res}: " + ", ".join(parts))
    lines += ["", "ReFL update (graded step + reward fwd+bwd), ours / pixel+VLM: " + "; ".join(summary) + "."]
    return lines


def markdown_sections(r: dict[str, Any]) -> dict[str, str]:
    """``{"flops": SD3.5 part + parameters, "flops-families": FLUX.1 / Z-Image part}`` (the latter only with
    families), as the doc sections of the same names hold them."""
    lines = sd3_markdown(r)
    p = r["parameters"]
    lines += ["", "Parameters: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in p.items() if v is not None)
              + f". Counting took {r['wall_s']:.0f} s."]
    out = {"flops": "\n".join(lines)}
    fam = families_markdown(r)
    if fam:
        params = []
        for f in r["families"].values():
            params.append(f"{f['label']}: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in f["parameters"].items()
                                                      if v is not None))
        fam += ["", "Parameters: " + "; ".join(params) + "."]
        out["flops-families"] = "\n".join(fam)
    return out


def markdown(r: dict[str, Any]) -> str:
    """The full markdown report of a run."""
    return "\n\n".join(markdown_sections(r).values())
