"""Two-process GRPO on CPU over gloo: every group spans both processes, rewards are gathered before
the advantages, the advantages each process trains on are those of the whole groups, the weights
stay identical on both ranks, and a mid-epoch checkpoint resumes to the same final weights."""

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
TINY = REPO / "recipes" / "tiny_grpo.yaml"
PROMPTS = REPO / "recipes" / "prompts" / "tiny_prompts.txt"
ACCELERATE = Path(sys.executable).parent / "accelerate"
#: 2 samples per process x 2 processes = one prompt x 4 per rollout batch: each group spans both ranks.
FAST = [
    f"data.prompts={PROMPTS}", "sampling.resolution=32", "sampling.num_steps=4", "algorithm.sde_window_size=1",
    "algorithm.sde_window_range=[0,2]", "eval.num_steps=4", "eval.batch_size=2", "train.batch_size=2",
    "algorithm.group_size=4", "algorithm.num_batches_per_epoch=2", "train.max_steps=4", "checkpoint.every=1",
    "checkpoint.keep_last=4", "eval.every=0", "eval.at_start=false",
]

pytestmark = pytest.mark.slow

SPY = """
import sys, torch
from safetensors.torch import save_file
from dinalrm_align.trainer.config import load_train_config
from dinalrm_align.trainer.loop import Trainer
from dinalrm_align.trainer.policy import trainable_state_dict

torch.set_num_threads(1)
recipe, out, *overrides = sys.argv[1:]
trainer = Trainer(load_train_config(recipe, overrides))
algo = trainer.algorithm
rollouts = []
rollout_epoch = algo._rollout_epoch
def spy(ctx, prompts):
    rollout_epoch(ctx, prompts)
    rollouts.append(dict(algo.last_rollout))
algo._rollout_epoch = spy
trainer.train()
rank = trainer.accelerator.process_index
save_file(trainable_state_dict(trainer.transformer), f"{out}/weights_rank{rank}.safetensors")
torch.save(rollouts, f"{out}/rollouts_rank{rank}.pt")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` 2 CPU processes (DDP over gloo; ``ACCELERATE_USE_CPU`` + ``--multi_gpu``)."""
    drop = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        HF_HUB_OFFLINE="1", WANDB_MODE="disabled", ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"),
    )
    cmd = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_grpo_two_processes_groups_span_ranks_and_resume(tmp_path):
    from safetensors.torch import load_file

    from dinalrm_align.algorithms.grpo import compute_advantages

    script = tmp_path / "spy.py"
    script.write_text(SPY)
    run = tmp_path / "run"
    proc = launch([str(script), str(TINY), str(tmp_path), f"run_dir={run}", *FAST], tmp_path)
    assert "2 process(es)" in proc.stdout + proc.stderr  # the batching plan is printed at start
    w0, w1 = (load_file(str(tmp_path / f"weights_rank{r}.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys() and w0 and all(torch.equal(w0[k], w1[k]) for k in w0)

    r0, r1 = (torch.load(tmp_path / f"rollouts_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(r0) == len(r1) == 2  # 4 optimizer steps = 2 epochs of 2 steps
    for a, b in zip(r0, r1):
        assert a["epoch"] == b["epoch"] and a["windows"] == b["windows"]  # shared window draws
        ids0, ids1 = a["group_ids"].view(2, 2), b["group_ids"].view(2, 2)  # (batch, sample)
        assert torch.equal(ids0, ids1) and bool((ids0[:, :1] == ids0).all())  # one group per batch, on both ranks
        assert a["prompts"] == b["prompts"]
        assert not torch.equal(a["components"]["dina_lrm"], b["components"]["dina_lrm"])
        gathered = {k: torch.cat([a["components"][k], b["components"][k]]) for k in a["components"]}
        ids = torch.cat([a["group_ids"], b["group_ids"]])
        res = compute_advantages(gathered, ids, {"dina_lrm": 1.0}, global_std=True)  # the recipe's setting
        torch.testing.assert_close(torch.cat([a["advantages"], b["advantages"]]), res.advantages)
        for g in res.advantages.view(2, 2, 2).transpose(0, 1).reshape(2, 4):  # each group: zero mean
            assert abs(float(g.mean())) < 1e-5

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    final = run / "final" / "pytorch_lora_weights.safetensors"
    expected = load_file(str(final))
    final.unlink()
    launch(
        ["-m", "dinalrm_align.train", str(TINY), "--run-dir", str(run), "--resume", str(run / "checkpoints" / "step_000003")]
        + [a for o in FAST for a in ("--set", o)],
        tmp_path,
    )
    resumed = load_file(str(final))
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0)
