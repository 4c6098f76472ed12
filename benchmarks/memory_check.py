"""CPU validation of the memory model: fake-tensor prediction vs the peak RSS of a real run.

The same update (``memory_workloads``) is

1. *predicted*: models built on the meta device, turned into fake tensors, run under the tracker
   (the dynamic peak = peak live bytes minus what was resident before the update);
2. *measured* in a fresh process (``python -m benchmarks.memory_check --worker NAME``): the models
   are materialised with random values, one warm-up update runs (AdamW state, library buffers),
   then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and the measured update
   runs; measured = peak RSS minus RSS before the update. glibc is told to serve every block of
   64 KiB or more with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the RSS at once
   and the peak RSS follows the live tensor bytes. The same process then runs the update once more
   under the tracker on real tensors (fake and real tracking must agree).

Scale: SD3.5-M with widths / 8 (inner 192), 4 policy blocks, a 2-block DiNa-LRM, fp32, batch 1,
T5 length 64; the latent reward at 768 px (96 x 96 latents, 2304 image tokens) and the pixel reward
(VAE decode + CLIP) at 512 px, sizes at which the update allocates 0.2-0.9 GB, far above RSS noise.
The update is accepted when |predicted - measured| <= 15 % of measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from benchmarks import memory_model as M  # noqa: E402
from benchmarks import memory_workloads as W  # noqa: E402
from benchmarks.memory_backbones import sd3_backbone  # noqa: E402

TOLERANCE = 0.15
#: name -> (reward, resolution, checkpointing of policy and reward, weight dtype)
WORKLOADS: dict[str, tuple[str, int, bool, torch.dtype]] = {
    "refl_dina": ("dina", 768, False, torch.float32),
    "refl_dina_ckpt": ("dina", 768, True, torch.float32),
    "refl_dina_bf16": ("dina", 768, False, torch.bfloat16),
    "refl_clip": ("clip", 512, False, torch.float32),
}
DEFAULT_WORKLOADS = ("refl_dina", "refl_dina_ckpt", "refl_dina_bf16", "refl_clip")


def validation_preset() -> C.Preset:
    """``small`` (widths / 8) with 4 policy blocks (dual attention in 0-1) and a 2-block reward model."""
    preset = C.get_preset("small")
    preset.name = "validation"
    preset.transformer = dict(preset.transformer, num_layers=4, dual_attention_layers=(0, 1))
    preset.rm_model = copy.deepcopy(preset.rm_model)
    preset.rm_model.update(num_transformer_layers=2, visual_head_idx=[1, 2], text_head_idx=[1, 2])
    return preset


def _models(name: str, kind: str) -> tuple[W.Models, tuple[str, int, bool, torch.dtype]]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown validation workload {name!r}; choose from {sorted(WORKLOADS)}")
    reward, res, _, dtype = spec = WORKLOADS[name]
    setting = W.Setting(resolution=res, t5_length=64, dtype=dtype, kl_beta=0.0)
    return W.Models(sd3_backbone(validation_preset()), [reward], setting, kind=kind), spec


def _row(spec: tuple[str, int, bool, torch.dtype]) -> Any:
    from benchmarks.memory import Row

    reward, _, ckpt, _ = spec
    return Row("refl", reward, ckpt, ckpt)


def predict(name: str) -> dict[str, Any]:
    """Fake-tensor run: dynamic peak bytes and the breakdown."""
    from benchmarks.memory import measure_row

    models, spec = _models(name, "fake")
    r = measure_row(models, _row(spec), spec[0])
    return {"dynamic_peak_bytes": r["dynamic_peak_bytes"], "phase": r["phase"], "wall_s": r["wall_s"]}


def worker(name: str) -> dict[str, Any]:
    """Real run in this (fresh) process: peak RSS delta of one update and the tracker on real tensors."""
    from benchmarks.memory import _set_checkpointing, measure_row

    torch.set_num_threads(1)
    models, spec = _models(name, "real")
    row = _row(spec)
    _set_checkpointing(models, row)
    with models.context():
        W.refl_update(models, spec[0])  # warm-up
        gc.collect()
        M.reset_peak_rss()
        before = M.rss_bytes()
        t0 = time.perf_counter()
        W.refl_update(models, spec[0])
        wall = time.perf_counter() - t0
        measured = M.peak_rss_bytes() - before
    gc.collect()
    tracked = measure_row(models, row, spec[0])["dynamic_peak_bytes"]
    return {"rss_peak_delta_bytes": measured, "tracked_real_bytes": tracked, "update_s": wall}


def validate(names: tuple[str, ...] = DEFAULT_WORKLOADS, timeout: float = 600.0) -> dict[str, Any]:
    """Predict and measure each workload; ``ok`` when every prediction is within :data:`TOLERANCE`."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1")
    out: dict[str, Any] = {"tolerance": TOLERANCE, "workloads": {}}
    for name in names:
        pred = predict(name)
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory_check", "--worker", name],
            cwd=C.REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"validation worker {name} failed:\n{proc.stderr[-3000:]}")
        real = json.loads(proc.stdout.strip().splitlines()[-1])
        p, m = pred["dynamic_peak_bytes"], real["rss_peak_delta_bytes"]
        reward, res, ckpt, dtype = WORKLOADS[name]
        out["workloads"][name] = {
            "reward": reward, "resolution": res, "checkpointing": ckpt, "dtype": str(dtype).replace("torch.", ""),
            "predicted_bytes": p, "measured_rss_bytes": m, "tracked_real_bytes": real["tracked_real_bytes"],
            "relative_error": (p - m) / m, "fake_vs_real_tracker": (p - real["tracked_real_bytes"]) / max(p, 1),
            "ok": abs(p - m) <= TOLERANCE * m, "real_update_s": real["update_s"],
        }
    out["ok"] = all(w["ok"] for w in out["workloads"].values())
    return out


def markdown(v: dict[str, Any]) -> str:
    """The validation table."""
    rows = []
    for name, w in v["workloads"].items():
        rows.append([
            name, f"{w['resolution']} px, {w['dtype']}", "yes" if w["checkpointing"] else "no",
            f"{w['predicted_bytes'] / 1e6:.1f}",
            f"{w['measured_rss_bytes'] / 1e6:.1f}", f"{100 * w['relative_error']:+.1f} %",
            f"{w['tracked_real_bytes'] / 1e6:.1f}", "ok" if w["ok"] else "**FAILED**",
        ])
    head = (f"**Validation on this CPU** (reduced SD3, a real update in a fresh process; accepted within "
            f"{100 * v['tolerance']:.0f} %): {'all within tolerance' if v['ok'] else 'OUT OF TOLERANCE'}.")
    table = C.md_table(["update", "size", "grad ckpt", "predicted MB (fake tensors)", "measured MB (peak RSS delta)",
                        "error", "tracker on real tensors MB", "result"], rows)
    return head + "\n\n" + table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", default=None, help="(internal) measure one workload in this process")
    parser.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS), choices=sorted(WORKLOADS))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    result = validate(tuple(args.workloads))
    print(markdown(result))


if __name__ == "__main__":
    main()
