"""Does alignment with the learned latent reward move the TRUE objective? The colour world, where truth is known.

``python -m benchmarks.alignment`` (``--quick`` for the small variant the test runs) builds one colour world
(tiny SD3.5-style policy), its preference pairs and reward models, then trains policies with the one Trainer,
each configuration over several seeds, and measures on held-out prompts:

* golden reward before / after (95 % t-interval over seeds), the share of the gap to the ceiling closed
  (ceiling: :mod:`benchmarks.alignment_setup`), the learned reward before / after and the Spearman rank
  correlation of golden and learned reward over the run's evaluations;
* a ReFL ablation, one change at a time from the u=0.4 latent reward: the ensemble reward (u in {0.2, 0.5,
  0.7}), LoRA weight decay, the flow-matching regulariser, early stopping on a held-out proxy (the pixel
  reward model), a reward model trained on twice the pairs; then the helpful ones combined; GRPO with the
  latent reward;
* latent vs pixel reward (VAE decode + a small image-text CNN trained on the same pairs) in ReFL at equal FLOPs
  per update (``FlopCounterMode`` on the first update; the pixel run's batch is scaled to match): golden gain
  per TFLOP and per update wall-second;
* controls: a random (untrained) latent reward model and the sign-flipped learned reward.

Writes ``benchmarks/results/alignment.json`` (``alignment_quick.json`` with ``--quick``), PNG curves next to it
and prints a markdown report. Every number is measured in the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # `python benchmarks/alignment.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.alignment_report import aggregate, draw_pictures, markdown_report  # noqa: E402
from benchmarks.alignment_runs import RunSpec, run_one  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: GRPO in the 4-step colour world: 4 samples per prompt, the SDE on 2 of the 4 steps, on-policy updates.
GRPO_SECTION = {"group_size": 4, "num_batches_per_epoch": 1, "sde_type": "sde", "noise_level": 0.7,
                "sde_window_size": 2, "sde_window_range": [0, 4], "cfg": False, "clip_range": 1e-2, "kl_beta": 0.0}


def world_config(quick: bool, out: Path, backbone: str = "sd3") -> Any:
    from dinalrm_align.demo.config import ColourWorldConfig

    if quick:  # the demo's world and pairs; a shorter reward-model training
        return ColourWorldConfig(out_dir=str(out), backbone=backbone, rm_steps=250, eval_us=[0.4], eval_max_pairs=200,
                                 progress=False, num_threads=1)
    return ColourWorldConfig(out_dir=str(out), backbone=backbone, rm_steps=320, eval_us=[0.2, 0.4, 0.6], progress=False,
                             num_threads=1)


def plan(quick: bool, steps: int | None = None) -> dict[str, list[RunSpec]]:
    """Group -> its configurations (each run over every seed); ``steps`` overrides the updates per run."""
    default_steps, batch, every = (50, 8, 25) if quick else (80, 16, 20)
    steps = steps or default_steps
    every = min(every, steps)
    base = RunSpec("ReFL, latent reward u=0.4", steps=steps, batch_size=batch, eval_every=every)
    if quick:
        return {"main": [base], "controls": [replace(base, name="ReFL, random reward model", reward="random"),
                                             replace(base, name="ReFL, sign-flipped reward", reward="flipped")]}
    one_at_a_time = [
        replace(base, name="+ ensemble reward u in {0.2, 0.5, 0.7}", ensemble=True),
        replace(base, name="+ LoRA weight decay 1.0", weight_decay=1.0),
        replace(base, name="+ flow-matching regulariser (lambda 0.02)", fm_lambda=0.02),
        replace(base, name="+ early stopping on the pixel proxy", early_stop=True),
        replace(base, name="+ reward model on 2x pairs", reward="latent_more"),
        replace(base, name="combined: ensemble + weight decay + early stopping + 2x pairs", ensemble=True,
                weight_decay=1.0, early_stop=True, reward="latent_more"),
    ]
    grpo = RunSpec("GRPO, latent reward u=0.4", algorithm="grpo", steps=steps, batch_size=batch, eval_every=every,
                   lr=3e-2)
    pixel = replace(base, name="ReFL, pixel reward (equal FLOPs / update)", reward="pixel")
    return {"ablation": [base, *one_at_a_time], "grpo": [grpo], "pixel": [pixel],
            "controls": [replace(base, name="ReFL, random reward model", reward="random"),
                         replace(base, name="ReFL, sign-flipped reward", reward="flipped")]}


def equal_flops_batch(env: Any, latent: RunSpec, pixel: RunSpec) -> tuple[int, dict[str, float]]:
    """The pixel run's batch size whose FLOPs per ReFL update match the latent run's (both measured on one
    update of a throwaway 1-step run at the latent batch size)."""
    probes = {}
    for spec in (latent, pixel):
        probe = replace(spec, name=f"flop probe {spec.reward}", steps=1, eval_every=0)
        result = run_one(env, probe, seed=0)
        probes[spec.reward] = float(result["flops_per_update"])
    ratio = probes["latent"] / probes["pixel"]
    return max(1, round(latent.batch_size * ratio)), probes


def main(argv: list[str] | None = None) -> int:
    from benchmarks.alignment_setup import build_env

    p = argparse.ArgumentParser(prog="python -m benchmarks.alignment", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small world, reward model and runs (the test's size)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (>= 3 for the report)")
    p.add_argument("--backbone", choices=("sd3", "flux", "zimage"), default="sd3", help="tiny policy family")
    p.add_argument("--out", default=None, help="work folder (default runs/alignment[_quick])")
    p.add_argument("--json", default=None, help="result file (default benchmarks/results/alignment[_quick].json)")
    p.add_argument("--markdown", default=None, help="also write the markdown report here")
    p.add_argument("--steps", type=int, default=None, help="override the updates per run (smoke runs)")
    p.add_argument("--rm-steps", type=int, default=None, help="override the reward-model steps (smoke runs)")
    p.add_argument("--from-json", default=None, help="only print the markdown report of an earlier result file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.from_json:
        path = Path(args.from_json)
        if not path.is_file():
            p.error(f"result file not found: {path}")
        data = json.loads(path.read_text())
        draw_pictures(data, path)
        report = markdown_report(data)
        if args.markdown:
            Path(args.markdown).write_text(report)
        print(report)
        return 0
    suffix = ("_quick" if args.quick else "") + ("" if args.backbone == "sd3" else f"_{args.backbone}")
    out = Path(args.out or f"runs/alignment{suffix}")
    json_path = Path(args.json or RESULTS / f"alignment{suffix}.json")
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    cfg = world_config(args.quick, out, args.backbone)
    if args.rm_steps:
        cfg.rm_steps = args.rm_steps

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    env, setup = build_env(cfg, out, pixel_steps=300 if args.quick else 800, grpo=GRPO_SECTION, log=log,
                           more_pairs_factor=1 if args.quick else 2, train_more=not args.quick,
                           train_pixel=not args.quick)
    groups = plan(args.quick, args.steps)
    if "pixel" in groups:
        batch, probes = equal_flops_batch(env, groups["ablation"][0], groups["pixel"][0])
        groups["pixel"] = [replace(groups["pixel"][0], batch_size=batch)]
        setup["flop_probe_per_update"] = probes
    runs: dict[str, list[dict[str, Any]]] = {}
    for specs in groups.values():
        for spec in specs:
            for seed in range(args.seeds):
                log(f"[alignment] {spec.name}, seed {seed} ...")
                result = run_one(env, spec, seed)
                runs.setdefault(spec.name, []).append(result)
                log(f"[alignment]   golden {result['golden_before']:.4f} -> {result['golden_after']:.4f}, "
                    f"learned {result['learned_before']:.2f} -> {result['learned_after']:.2f}, {result['run_wall_s']:.0f} s")
    results = {name: {**aggregate(group, setup["ceiling"]), "batch_size": group[0]["batch_size"]}
               for name, group in runs.items()}
    names = lambda key: [s.name for s in groups.get(key, [])]  # noqa: E731
    data = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, 1 torch thread",
        "backbone": args.backbone,
        "command": "python -m benchmarks.alignment" + (" --quick" if args.quick else "")
                   + (f" --backbone {args.backbone}" if args.backbone != "sd3" else "")
                   + (f" --seeds {args.seeds}" if args.seeds != 3 else "") + (f" --steps {args.steps}" if args.steps else "")
                   + (f" --rm-steps {args.rm_steps}" if args.rm_steps else ""),
        "seeds": args.seeds,
        "setup": setup,
        "ablation_rows": names("ablation") + names("main"), "other_rows": names("grpo"),
        "cost_rows": (names("ablation") or names("main"))[:1] + names("pixel"), "control_rows": names("controls"),
        "results": results,
        "runs": runs,
        "total_wall_s": time.perf_counter() - t_wall,
        "total_cpu_s": time.process_time() - t_cpu,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    data["pictures"] = pictures = draw_pictures(data, json_path)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(json_path)
    report = markdown_report(data)
    if args.markdown:
        Path(args.markdown).write_text(report)
    print(report)
    print(f"results: {json_path}\npictures: {', '.join(pictures.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
