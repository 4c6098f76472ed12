"""Peak accelerator memory of one ReFL and one GRPO update at real scale, without a GPU or weights.

The published architectures are built on the meta device, turned into fake tensors (shapes,
dtypes, storages; no memory) and one update is *run* under torch's ``MemTracker`` (a dispatch mode
that follows every storage until it is freed): the peak is the maximum of live bytes during the
update, split into parameters, optimizer state, gradients, activations and backward temporaries.
Mixed precision follows CUDA's autocast policy (``memory_model.autocast``). Setting (default):
SD3.5-Medium policy at 1024 x 1024 (latents 16 x 128 x 128), batch 1, T5 length 128, bf16 frozen
weights, policy LoRA r 32 / alpha 64 on the joint-attention projections in fp32 with AdamW.

Rows: ReFL (graded forward with grad, no CFG -> ``x0_hat`` -> reward -> backward -> AdamW) with
DiNa-LRM (own copy of the kept blocks; reward LoRA merged; base weights shared with the policy), VAE
decode + CLIP-H/14 and VAE decode + Qwen2-VL-7B, each without / with gradient checkpointing (policy;
policy + reward backbone); GRPO (one SDE step, no-grad KL reference forward, without / with CFG and
checkpointing); the rewards' no-grad scoring peak; one no-grad CFG rollout step. Each peak is given for
the update alone and with the frozen text encoders and the VAE resident, as the paper's setting keeps them.

``--backbone flux`` / ``zimage``: the same ReFL rows for FLUX.1-dev and Z-Image-Turbo (their reward configs,
the FLUX AE, their text encoders; ``memory_backbones``), written to ``memory_<backbone>.json`` and the doc
section ``memory-<backbone>``.

The model is validated on this CPU (``--validate``): a reduced SD3 is run for real in a fresh
process and its peak RSS is compared with the fake-tensor prediction (see ``memory_check``).

Usage::

    python -m benchmarks.memory                         # all SD3.5 rows, ~6-7 min on 2 cores
    python -m benchmarks.memory --backbone flux         # FLUX.1-dev ReFL rows (zimage: Z-Image-Turbo)
    python -m benchmarks.memory --quick --validate      # fewer rows + the CPU validation (make bench)
    python -m benchmarks.memory --update-doc docs/benchmarks.md
    python -m benchmarks.memory --preset tiny --resolution 64 --t5-length 16 --quick   # tests
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/x.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from benchmarks import memory_model as M  # noqa: E402
from benchmarks import memory_workloads as W  # noqa: E402
from benchmarks.memory_backbones import BACKBONES, get_backbone  # noqa: E402

RESULTS = C.REPO_ROOT / "benchmarks" / "results"
DEFAULT_JSON = RESULTS / "memory.json"
#: ``--quick`` writes here by default, so a quick run never replaces the full results.
QUICK_JSON = RESULTS / "memory_quick.json"
KINDS: tuple[str, ...] = ("refl", "grpo", "reward", "rollout")
#: Rewards measured by default: SD3.5 has the released model (LoRA merged too); the other families the ReFL rows.
DEFAULT_REWARDS = {"sd3": ("dina", "dina_merged", "dina_shared", "clip", "vlm"),
                   "flux": ("dina", "dina_shared", "clip", "vlm"), "zimage": ("dina", "dina_shared", "clip", "vlm")}
DEFAULT_KINDS = {"sd3": KINDS, "flux": ("refl",), "zimage": ("refl",)}
#: The paper's measured ReFL peaks, SD3.5-M, 1024 x 1024, batch 1 (GB as printed).
PAPER_REFL_PEAK_GB = {"dina": 39.1, "vlm": 80.4}
GB = 1e9


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    kind: str  # "refl" | "grpo" | "reward" | "rollout"
    reward: str | None = None
    policy_ckpt: bool = False
    reward_ckpt: bool = False
    cfg: bool = False


def plan(quick: bool, reward_keys: Sequence[str], kinds: Sequence[str] = KINDS) -> list[Row]:
    """Rows to measure: everything, or (``quick``) one latent and one pixel row of each kind (no merged or
    shared variant); ``kinds`` selects among ReFL, GRPO, no-grad reward scoring and the rollout step."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown row kinds {unknown}; choose from {list(KINDS)}")
    rows: list[Row] = []
    ckpts = [(False, False), (True, False), (True, True)]
    for key in reward_keys if "refl" in kinds else ():
        for pol, rew in ckpts:
            if quick and (pol != rew or key in ("dina_merged", "dina_shared") or (key != "dina" and pol)):
                continue
            rows.append(Row("refl", key, pol, rew))
    for cfg in (False, True) if "grpo" in kinds else ():
        for pol in (False, True):
            if not (quick and (cfg or pol)):
                rows.append(Row("grpo", None, pol, False, cfg))
    if "reward" in kinds:
        rows += [Row("reward", key) for key in reward_keys if not (quick and key != "dina")]
    if "rollout" in kinds and not quick:
        rows.append(Row("rollout", cfg=True))
    return rows


def _set_checkpointing(models: W.Models, row: Row) -> None:
    p = models.policy
    p.enable_gradient_checkpointing() if row.policy_ckpt else p.disable_gradient_checkpointing()
    for key, reward in models.rewards.items():  # all off first: the pixel rewards share one VAE
        reward.checkpointing(models.reward_modules[key], False)
    if row.reward_ckpt and row.reward in models.rewards:
        models.rewards[row.reward].checkpointing(models.reward_modules[row.reward], True)


def _reward_parts(models: W.Models, key: str) -> tuple[list[torch.nn.Module], int, int]:
    """(modules the reward call runs, its own weight bytes, VAE decoder bytes). A reward sharing the policy's
    base weights owns only what the policy does not hold (head, reward LoRA)."""
    mods = models.reward_modules[key]
    if "vae" in mods:
        scorer, decoder = mods["scorer"], models.vae_decoder()
        return [decoder, scorer], M.tensor_bytes(scorer), M.tensor_bytes(decoder)
    rm = mods["reward_model"]
    return [rm], M.tensor_bytes(models.policy, rm) - M.tensor_bytes(models.policy), 0


def measure_row(models: W.Models, row: Row, grpo_reward: str) -> dict[str, Any]:
    """Run one row under the tracker; bytes per category at the peak and the peaks with residents.

    ReFL and reward rows track the policy and the reward they run. GRPO and rollout rows track the
    policy only; a reward is resident but idle then, and its weights are added per reward
    (``peak_with_reward_bytes``; ``peak_update_bytes`` uses ``grpo_reward``).
    """
    t0 = time.perf_counter()
    _set_checkpointing(models, row)
    lora = sum(p.numel() * p.element_size() for p in models.lora)
    weights = {"policy_base": M.tensor_bytes(models.policy) - lora, "policy_lora": lora, "reward": 0, "vae_decoder": 0}
    tracked: list[torch.nn.Module] = [models.policy]
    runs_reward = row.kind in ("refl", "reward")
    if runs_reward:
        mods, weights["reward"], weights["vae_decoder"] = _reward_parts(models, row.reward)
        tracked += mods
    fn = {
        "refl": lambda cb: W.refl_update(models, row.reward, cb),
        "grpo": lambda cb: W.grpo_update(models, row.cfg, cb),
        "reward": lambda cb: W.reward_inference(models, row.reward, cb),
        "rollout": lambda cb: W.rollout_step(models, row.cfg, cb),
    }[row.kind]
    gc.collect()
    with models.context():
        tracker = M.PeakTracker()
        tracker.track_external(*tracked, models.optimizer, *models.input_tensors())
        start = tracker.current()
        with tracker:
            fn(tracker.reset_mod_stats)
        peak = tracker.peak()
    _set_checkpointing(models, Row("none"))
    base = M.tensor_bytes(*tracked)
    with_reward = {}
    if not runs_reward:
        for key in models.rewards:
            with_reward[key] = peak["Total"] + M.tensor_bytes(*tracked, *_reward_parts(models, key)[0]) - base
    update_peak = with_reward.get(grpo_reward, peak["Total"])
    resident = [*tracked, *([] if runs_reward else _reward_parts(models, grpo_reward)[0])]
    encoders = M.tensor_bytes(*models.text_encoders.values())
    vae_rest = M.tensor_bytes(*resident, models.vae) - M.tensor_bytes(*resident)
    return {
        **asdict(row),
        "label": row_label(row, models),
        "phase": tracker.peak_phase,
        "tracked_peak_bytes": peak["Total"],
        "peak_update_bytes": update_peak,
        "peak_with_reward_bytes": with_reward,
        "peak_pipeline_bytes": update_peak + encoders + vae_rest,
        "weights_bytes": weights,
        "tracked_weights_bytes": peak.get("Parameter", 0) + peak.get("Buffer", 0),
        "text_encoders_bytes": encoders,
        "vae_rest_bytes": vae_rest,
        "optimizer_bytes": peak.get("Optstate", 0),
        "gradient_bytes": peak.get("Gradient", 0),
        "activation_bytes": peak.get("Activation", 0),
        "temporary_bytes": peak.get("Temp", 0) + peak.get("Other", 0),
        "dynamic_peak_bytes": peak["Total"] - start["Total"],
        "wall_s": time.perf_counter() - t0,
    }


def row_label(row: Row, models: W.Models) -> str:
    if row.kind in ("refl", "reward"):
        return models.rewards[row.reward].label if row.reward in models.rewards else str(row.reward)
    return "GRPO, CFG" if (row.kind == "grpo" and row.cfg) else ("GRPO" if row.kind == "grpo" else "rollout step, CFG")


def run(
    preset_name: str = "full",
    resolution: int = 1024,
    t5_length: int = 128,
    quick: bool = False,
    reward_keys: Sequence[str] | None = None,
    validate: bool = False,
    backbone: W.Backbone | str = "sd3",
    kinds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Measure every planned row for ``backbone`` (a name of ``memory_backbones.BACKBONES`` at the preset, or a
    built ``Backbone``); one fake build. Rewards and row kinds default to the backbone's (``DEFAULT_*``)."""
    t0 = time.perf_counter()
    setting = W.Setting(resolution=resolution, t5_length=t5_length)
    key = backbone if isinstance(backbone, str) else "sd3"
    reward_keys = list(reward_keys or DEFAULT_REWARDS.get(key, DEFAULT_REWARDS["sd3"]))
    kinds = tuple(kinds or DEFAULT_KINDS.get(key, KINDS))
    backbone = get_backbone(backbone, preset_name) if isinstance(backbone, str) else backbone
    models = W.Models(backbone, reward_keys, setting, kind="fake")
    grpo_reward = "dina" if "dina" in reward_keys else reward_keys[0]
    rows = [measure_row(models, row, grpo_reward) for row in plan(quick, reward_keys, kinds)]
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "backbone": backbone.name,
        "backbone_key": key,
        "text_encoders_label": backbone.text_encoders_label,
        "preset": preset_name,
        "setting": {**asdict(setting), "dtype": str(setting.dtype).replace("torch.", "")},
        "latent_shape": list(models.inputs["latents"].shape),
        "quick": quick,
        "grpo_reward": grpo_reward,
        "grpo_reward_label": models.rewards[grpo_reward].label,
        "reward_labels": {k: rw.label for k, rw in models.rewards.items()},
        "fake_value_reads": getattr(models.mode, "value_reads", 0),
        "versions": {"torch": torch.__version__, **_versions()},
        "rows": rows,
        "parameters": {
            "text_encoders": {k: C.param_count(m) for k, m in models.text_encoders.items()},
            "policy_lora": sum(p.numel() for p in models.lora),
        },
    }
    if validate:
        from benchmarks import memory_check

        result["validation"] = memory_check.validate()
    result["wall_s"] = time.perf_counter() - t0
    return result


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------ output


def _g(x: float) -> str:
    return f"{x / GB:.2f}"


_CKPT = {(False, False): "none", (True, False): "policy", (True, True): "policy + reward"}


def markdown(r: dict[str, Any]) -> str:
    """The markdown report of a run: ReFL table, GRPO / rollout table, reward scoring table."""
    s, rows = r["setting"], r["rows"]
    lat = "x".join(str(d) for d in r["latent_shape"][1:])
    enc = rows[0]["text_encoders_bytes"]
    encoders = r.get("text_encoders_label", "CLIP-L, CLIP-G and T5-XXL")
    text = "T5" if r.get("backbone_key", "sd3") in ("sd3", "flux") else "text"
    lines = [
        f"{r['backbone']} policy, {s['resolution']}x{s['resolution']} (latents {lat}), batch {s['batch']}, {text} "
        f"{s['t5_length']}, {s['dtype']} frozen weights, policy LoRA ({r['parameters']['policy_lora'] / 1e6:.1f} M "
        "params) in fp32 + AdamW, CUDA autocast "
        f"policy; GB = 1e9 bytes of tensors. Run {r['date']} with torch {r['versions']['torch']}, diffusers "
        f"{r['versions']['diffusers']}, transformers {r['versions']['transformers']} ({r['wall_s']:.0f} s"
        f"{', --quick' if r['quick'] else ''}).",
        "",
        f"**ReFL update** (graded policy forward with grad, no CFG, reward on x0_hat, backward, AdamW). **peak** = "
        "weights the update touches + AdamW state + gradients + activations; **+ encoders** adds "
        f"{encoders} ({_g(enc)} GB) and the rest of the VAE, resident as in the paper's setting. Breakdown at "
        "the peak (GB):",
        "",
    ]
    table = []
    for e in (e for e in rows if e["kind"] == "refl"):
        w = e["weights_bytes"]
        table.append([
            e["label"], _CKPT[(e["policy_ckpt"], e["reward_ckpt"])], f"**{_g(e['peak_update_bytes'])}**",
            f"**{_g(e['peak_pipeline_bytes'])}**", _g(w["policy_base"]),
            _g(w["policy_lora"] + e["optimizer_bytes"] + e["gradient_bytes"]), _g(w["reward"]), _g(w["vae_decoder"]),
            _g(e["activation_bytes"]), _g(e["temporary_bytes"]), e["phase"],
        ])
    lines.append(C.md_table(["reward", "grad ckpt", "peak", "+ encoders", "policy base", "LoRA + AdamW + grads",
                             "reward weights", "VAE decoder", "activations", "bwd temps", "peak in"], table))
    others = [e for e in rows if e["kind"] in ("grpo", "rollout")]
    if others:
        keys = [k for k in others[0]["peak_with_reward_bytes"] if k != "dina_merged"]  # same weights as dina
        labels = r["reward_labels"]
        lines += ["", "**GRPO update** (one SDE step: no-grad KL reference forward, policy forward with grad, "
                  "Flow-GRPO log-prob, PPO-clip + KL, backward, AdamW) and one no-grad rollout step. The reward is "
                  "resident but idle: peak with each reward's weights (GB):", ""]
        table = []
        for e in others:
            name = ("GRPO" if e["kind"] == "grpo" else "rollout step") + (", CFG" if e["cfg"] else "")
            table.append([name, _CKPT[(e["policy_ckpt"], False)] if e["kind"] == "grpo" else "-",
                          _g(e["tracked_peak_bytes"]), _g(e["activation_bytes"] + e["temporary_bytes"]),
                          *[_g(e["peak_with_reward_bytes"][k]) for k in keys],
                          _g(e["peak_pipeline_bytes"]), e["phase"]])
        lines.append(C.md_table(["update", "grad ckpt", "policy side", "activations + temps",
                                 *[f"with {labels.get(k, k)}" for k in keys], f"+ encoders ({r['grpo_reward_label']})",
                                 "peak in"], table))
    scoring = [e for e in rows if e["kind"] == "reward"]
    if scoring:
        lines += ["", "**Reward scoring without grad** (GRPO rewards on final latents; policy, LoRA and AdamW "
                  "resident) (GB):", ""]
        table = [[e["label"], _g(e["weights_bytes"]["reward"] + e["weights_bytes"]["vae_decoder"]),
                  _g(e["activation_bytes"] + e["temporary_bytes"]), _g(e["peak_update_bytes"]),
                  _g(e["peak_pipeline_bytes"])] for e in scoring]
        lines.append(C.md_table(["reward", "reward weights (+ VAE decoder)", "activations (no grad)", "peak",
                                 "+ encoders"], table))
    if r["preset"] == "full" and r.get("backbone_key", "sd3") == "sd3":
        lines += ["", _paper_comparison(r)]
    if r.get("fake_value_reads"):
        lines += ["", f"Value reads answered without data (the reward model's NaN/magnitude checks): "
                  f"{r['fake_value_reads']}."]
    if "validation" in r:
        from benchmarks import memory_check

        lines += ["", memory_check.markdown(r["validation"])]
    return "\n".join(lines)


def _paper_comparison(r: dict[str, Any]) -> str:
    """Our no-checkpointing ReFL peaks vs the paper's 39.1 / 80.4 GB."""
    pick = {e["reward"]: e for e in r["rows"] if e["kind"] == "refl" and not e["policy_ckpt"]}
    if "dina" not in pick or "vlm" not in pick:
        return "Paper comparison needs the DiNa-LRM and Qwen2-VL ReFL rows without checkpointing."
    d, v = pick["dina"], pick["vlm"]
    pd, pv = PAPER_REFL_PEAK_GB["dina"], PAPER_REFL_PEAK_GB["vlm"]
    return (
        f"**Against the paper** (ReFL, SD3.5-M, 1024^2, batch 1: {pd} GB with DiNa-LRM vs {pv} GB with HPSv3, "
        f"ratio {pd / pv:.2f}): no checkpointing, encoders resident: {_g(d['peak_pipeline_bytes'])} vs "
        f"{_g(v['peak_pipeline_bytes'])} GB (ratio {d['peak_pipeline_bytes'] / v['peak_pipeline_bytes']:.2f}); "
        f"update alone: {_g(d['peak_update_bytes'])} vs {_g(v['peak_update_bytes'])} GB (ratio "
        f"{d['peak_update_bytes'] / v['peak_update_bytes']:.2f}). Tensor bytes only: a card also holds the CUDA "
        "context and library workspaces, and the caching allocator reserves more than it hands out."
    )


def default_paths(backbone: str, quick: bool) -> tuple[Path, str]:
    """``(JSON path, doc section)`` of a run: ``memory[_flux|_zimage][_quick].json``, ``memory[-flux|-zimage]``."""
    suffix = "" if backbone == "sd3" else f"_{backbone}"
    json_path = RESULTS / f"memory{suffix}{'_quick' if quick else ''}.json"
    return json_path, "memory" + suffix.replace("_", "-")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="sd3", choices=list(BACKBONES),
                        help="policy family (flux / zimage: presets full and tiny)")
    parser.add_argument("--preset", default="full", choices=["full", "small", "tiny"])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--t5-length", type=int, default=128, help="text tokens (T5 for SD3 / FLUX, Qwen3 for Z-Image)")
    parser.add_argument("--quick", action="store_true", help="fewer rows (one latent and one pixel row per kind)")
    parser.add_argument("--rewards", nargs="+", default=None, choices=["dina", "dina_merged", "dina_shared", "clip", "vlm"],
                        help="default: the backbone's (DEFAULT_REWARDS)")
    parser.add_argument("--kinds", nargs="+", default=None, choices=list(KINDS),
                        help="row kinds (default: all for sd3, refl for flux / zimage)")
    parser.add_argument("--validate", action="store_true", help="also run the CPU validation (~1 min)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"default {DEFAULT_JSON.name} ({QUICK_JSON.name} with --quick; memory_<backbone>*.json)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="replace the memory section (memory-flux / memory-zimage) of this doc")
    args = parser.parse_args(argv)
    if args.resolution <= 0 or args.t5_length <= 0:
        parser.error("--resolution and --t5-length must be positive")
    if args.backbone != "sd3" and args.preset == "small":
        parser.error(f"--backbone {args.backbone} has presets full and tiny")
    result = run(args.preset, args.resolution, args.t5_length, args.quick, args.rewards, args.validate,
                 backbone=args.backbone, kinds=args.kinds)
    result["command"] = "python -m benchmarks.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result)
    print(text)
    default_json, section = default_paths(args.backbone, args.quick)
    path = args.json or default_json
    C.write_json(path, result)
    print(f"\nJSON: {path}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.update_doc:
        C.replace_doc_section(args.update_doc, section, text)
    return result


if __name__ == "__main__":
    main()
