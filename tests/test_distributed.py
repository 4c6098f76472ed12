"""Two-process runs on CPU over gloo: DDP (weights identical on both ranks, different prompts per rank)
and DeepSpeed ZeRO-2 (completes; resuming its checkpoint reproduces the uninterrupted weights)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_refl.yaml"
PROMPTS = REPO / "recipes" / "prompts" / "tiny_prompts.txt"
ACCELERATE = Path(sys.executable).parent / "accelerate"
FAST = [
    f"data.prompts={PROMPTS}", "sampling.num_steps=4", "algorithm.k_min=2", "algorithm.k_max=3",
    "eval.num_steps=4", "train.batch_size=2", "train.max_steps=3", "checkpoint.every=2",
]

pytestmark = pytest.mark.slow

SPY = """
import json, sys
from pathlib import Path
from safetensors.torch import save_file
from dinalrm_align.trainer.config import load_train_config
from dinalrm_align.trainer.loop import Trainer
from dinalrm_align.trainer.policy import trainable_state_dict

recipe, out, *overrides = sys.argv[1:]
trainer = Trainer(load_train_config(recipe, overrides))
seen = []
step = trainer.algorithm.train_step
def spy(ctx, prompts):
    seen.append(list(prompts))
    return step(ctx, prompts)
trainer.algorithm.train_step = spy
trainer.train()
rank = trainer.accelerator.process_index
save_file(trainable_state_dict(trainer.transformer), f"{out}/weights_rank{rank}.safetensors")
Path(f"{out}/prompts_rank{rank}.json").write_text(json.dumps(seen))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], tmp: Path, use_cpu: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch`` 2 processes. DDP on CPU needs ACCELERATE_USE_CPU; DeepSpeed must NOT get
    it (accelerate would silently fall back to plain multi-CPU); the trainer picks gloo by itself."""
    drop = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "ACCELERATE_USE_CPU"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"),
        PYTHONPATH=str(REPO),
    )
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [
        str(ACCELERATE), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_ddp_two_processes(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "spy.py"
    script.write_text(SPY)
    launch(["--multi_gpu", str(script), str(TINY), str(tmp_path), f"run_dir={tmp_path / 'run'}", *FAST], tmp_path)
    w0, w1 = (load_file(str(tmp_path / f"weights_rank{r}.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys() and w0
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    p0, p1 = (json.loads((tmp_path / f"prompts_rank{r}.json").read_text()) for r in (0, 1))
    assert len(p0) == len(p1) == 3
    assert all(not set(a) & set(b) for a, b in zip(p0, p1))  # each step: disjoint prompts per rank
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and Path(summary["final_dir"], "pytorch_lora_weights.safetensors").is_file()


def test_deepspeed_zero2_two_processes_and_resume(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    ds = ["--use_deepspeed", "--deepspeed_config_file", str(REPO / "recipes" / "deepspeed" / "zero2.json")]
    cli = ["-m", "dinalrm_align.train", str(TINY), "--run-dir", str(run)] + [a for o in FAST for a in ("--set", o)]
    proc = launch([*ds, *cli], tmp_path, use_cpu=False)
    assert "training finished" in proc.stdout + proc.stderr
    final = run / "final" / "pytorch_lora_weights.safetensors"
    full = load_file(str(final))
    ckpt = run / "checkpoints" / "step_000002"  # per-rank optimizer files: ZeRO really sharded it
    assert sorted(p.name for p in ckpt.glob("optimizer_rank*.pt")) == ["optimizer_rank00000.pt", "optimizer_rank00001.pt"]
    for pt in ckpt.glob("*.pt"):
        torch.load(pt, weights_only=True)
    final.unlink()
    launch([*ds, *cli, "--resume", str(ckpt)], tmp_path, use_cpu=False)
    resumed = load_file(str(final))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-6, atol=1e-8)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step3 = [r["train/loss"] for r in rows if r["step"] == 3 and "train/loss" in r]
    assert len(step3) == 2 and step3[0] == pytest.approx(step3[1], rel=1e-6)
