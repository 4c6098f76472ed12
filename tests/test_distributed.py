"""Two-process runs on CPU over gloo, for every algorithm of the one trainer (ReFL, GRPO, reward-model
training) under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (with every parameter really partitioned), plus
kill-and-resume under ZeRO-3: a run killed (SIGKILL) right after a checkpoint and resumed ends with
the same weights as the uninterrupted run. FSDP2 (the option for policies too big for ZeRO-2): accelerate
enables its FSDP plugin only on accelerators, so on CPU the policy LoRA is sharded with torch's own
``fully_shard`` (what accelerate's FSDP2 plugin calls) and must train exactly like the unsharded model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
TORCHRUN = Path(sys.executable).parent / "torchrun"
PROMPTS = REPO / "recipes" / "prompts" / "tiny_prompts.txt"

pytestmark = pytest.mark.slow

WORKER = """
import json, os, signal, sys
from pathlib import Path
from safetensors.torch import save_file
from dinalrm_align.trainer.loop import Trainer
from dinalrm_align.trainer.recipe import load_recipe

recipe, out, kill_at, *overrides = sys.argv[1:]
trainer = Trainer(load_recipe(recipe, overrides), progress=False)
seen = []
step = trainer.algorithm.train_step
def spy(batch):
    seen.append([int(b) if not isinstance(b, str) else b for b in batch])
    return step(batch)
trainer.algorithm.train_step = spy
if int(kill_at) > 0:
    save = trainer.save_checkpoint
    def save_then_die():
        path = save()
        if trainer.step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    trainer.save_checkpoint = save_then_die
trainer.train()
state = trainer._trainable_state()  # collective (ZeRO-3 gathers)
rank = trainer.accelerator.process_index
save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/weights_rank{rank}.safetensors")
Path(f"{out}/batches_rank{rank}.json").write_text(json.dumps(seen))
Path(f"{out}/sharding_rank{rank}.txt").write_text(trainer.sharding)
"""

REFL = [
    f"data.prompts={PROMPTS}", "sampling.num_steps=4", "algorithm.k_min=2", "algorithm.k_max=3", "eval.num_steps=2",
    "eval.every=0", "eval.at_start=false", "eval.at_end=false", "train.batch_size=2", "train.max_steps=4",
    "checkpoint.every=2", "sampling.resolution=32", "train.num_threads=1",
]
GRPO = [
    f"data.prompts={PROMPTS}", "train.batch_size=4", "algorithm.group_size=4", "train.max_steps=4",
    "checkpoint.every=2", "eval.every=0", "eval.at_start=false", "eval.at_end=false", "train.num_threads=1",
]
RM = [
    "model.pipeline=tiny", "model.preset=tiny", "model.max_sequence_length=4", "train.max_steps=4",
    "train.batch_size=4", "train.mixed_precision=no", "train.num_threads=1", "checkpoint.every=2",
    "eval.every=0", "eval.at_start=false", "eval.us=[0.4]", "tracking.log_with=none", "data.num_eval=16",
]


def _write_pairs(root: Path, n: int = 96) -> None:
    from dinalrm_align.rm_training.data import PairRecord, write_shard

    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        a, b = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
        a[0] += 1.0
        records.append(PairRecord(prompt=("a red cube", "a blue ball")[i % 2], chosen=a, rejected=b, votes_chosen=3,
                                  votes_rejected=1, height=16, width=16))
    write_shard(root / "part_00000.parquet", records)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ds_config(tmp: Path, stage: int) -> Path:
    """A ZeRO config that partitions every parameter of the tiny models (no persistence threshold)."""
    cfg = {
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1e6,
                              "stage3_prefetch_bucket_size": 1e6},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    path = tmp / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def _launch(tmp: Path, backend: str, recipe: Path, out: Path, overrides: list[str], kill_at: int = 0,
            expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch`` 2 processes. DDP on CPU needs ACCELERATE_USE_CPU; DeepSpeed must NOT get it
    (accelerate would silently fall back to plain multi-CPU); the trainer picks gloo by itself."""
    out.mkdir(parents=True, exist_ok=True)
    script = tmp / "worker.py"
    script.write_text(WORKER)
    drop = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "ACCELERATE_USE_CPU"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=str(REPO / ".pytest_cache" / "torch_extensions"))
    if backend == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
        kind = ["--multi_gpu"]
    else:
        kind = ["--use_deepspeed", "--deepspeed_config_file", str(_ds_config(tmp, int(backend[-1])))]
    cmd = [str(ACCELERATE), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *kind, str(script), str(recipe),
           str(out), str(kill_at), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / f"weights_rank{rank}.safetensors"))


def _case(tmp: Path, algorithm: str) -> tuple[Path, list[str]]:
    if algorithm == "refl":
        return REPO / "recipes" / "tiny_refl.yaml", REFL
    if algorithm == "grpo":
        return REPO / "recipes" / "tiny_grpo.yaml", GRPO
    data = tmp / "pairs"
    if not data.exists():
        _write_pairs(data)
    return REPO / "recipes" / "tiny_rm.yaml", [f"data.train={data}", "data.eval=null", *RM]


@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero3"])
@pytest.mark.parametrize("algorithm", ["refl", "grpo", "reward_model"])
def test_two_processes(tmp_path, backend, algorithm):
    recipe, overrides = _case(tmp_path, algorithm)
    out = tmp_path / "out"
    _launch(tmp_path, backend, recipe, out, [f"run_dir={tmp_path / 'run'}", *overrides])
    assert (out / "sharding_rank0.txt").read_text() == {"ddp": "none", "zero2": "zero2", "zero3": "zero3"}[backend]
    w0, w1 = _weights(out, 0), _weights(out, 1)
    assert w0.keys() == w1.keys() and w0
    for k in w0:  # every rank ends with the same (gathered) weights
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)
    b0, b1 = (json.loads((out / f"batches_rank{r}.json").read_text()) for r in (0, 1))
    assert len(b0) == len(b1) > 0
    if algorithm == "refl":  # each step: disjoint prompts per rank
        assert all(not set(a) & set(b) for a, b in zip(b0, b1))
    if algorithm == "reward_model":  # each step: disjoint pairs per rank
        assert all(not set(a) & set(b) for a, b in zip(b0, b1))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000002", "step_000004"]
    if backend != "ddp":  # DeepSpeed's own shards: one optimizer partition per rank
        shards = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step_000002").rglob("*optim_states.pt"))
        assert len(shards) == 2, shards


@pytest.mark.parametrize("algorithm", ["refl", "grpo", "reward_model"])
def test_zero3_kill_and_resume_equals_uninterrupted(tmp_path, algorithm):
    recipe, overrides = _case(tmp_path, algorithm)
    full, broken = tmp_path / "full", tmp_path / "broken"
    _launch(tmp_path, "zero3", recipe, full, [f"run_dir={tmp_path / 'run_full'}", *overrides])
    killed = _launch(tmp_path, "zero3", recipe, broken, [f"run_dir={tmp_path / 'run_broken'}", *overrides], kill_at=2,
                     expect_ok=False)
    assert killed.returncode != 0
    assert not (tmp_path / "run_broken" / "final").exists()
    assert (tmp_path / "run_broken" / "checkpoints" / "step_000002" / "checkpoint.json").is_file()
    _launch(tmp_path, "zero3", recipe, broken, [f"run_dir={tmp_path / 'run_broken'}", "checkpoint.resume=latest",
                                                *overrides])
    a, b = _weights(full, 0), _weights(broken, 0)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    rows = [json.loads(line) for line in (tmp_path / "run_broken" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == sorted(set(steps)), "metrics.jsonl must not repeat steps after a resume"


FSDP_WORKER = """
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from dinalrm_align.tiny import tiny_pipeline
from dinalrm_align.trainer.config import ModelConfig
from dinalrm_align.trainer.policy import make_trainable
from dinalrm_align.backbones.registry import get_adapter

sharded, out = sys.argv[1] == "1", sys.argv[2]
if sharded:
    dist.init_process_group("gloo")
torch.manual_seed(0)
pipe = tiny_pipeline("sd3")
tr = pipe.transformer
params = make_trainable(tr, ModelConfig(pretrained="tiny"), get_adapter("sd3"))
if sharded:
    for block in tr.transformer_blocks:
        fully_shard(block)
    fully_shard(tr)
    params = [p for p in tr.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-2)
g = torch.Generator().manual_seed(1)
for step in range(3):
    x = torch.randn(2, 16, 16, 16, generator=g)
    pe, pooled = torch.randn(2, 8, 32, generator=g), torch.randn(2, 64, generator=g)
    out_t = tr(hidden_states=x, timestep=torch.tensor([500.0, 300.0]), encoder_hidden_states=pe,
               pooled_projections=pooled, return_dict=False)[0]
    loss = out_t.pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in tr.named_parameters()
         if p.requires_grad}
rank = dist.get_rank() if sharded else 0
torch.save({k: v.clone() for k, v in state.items()}, f"{out}/fsdp_{int(sharded)}_rank{rank}.pt")
"""


def test_fsdp2_shards_and_trains_the_policy_lora_like_unsharded(tmp_path):
    script = tmp_path / "fsdp_worker.py"
    script.write_text(FSDP_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"}}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    single = subprocess.run([sys.executable, str(script), "0", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    two = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script),
                          "1", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-4000:]
    ref = torch.load(tmp_path / "fsdp_0_rank0.pt", weights_only=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"fsdp_1_rank{rank}.pt", weights_only=True)
        assert got.keys() == ref.keys() and any("lora_" in k for k in ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate's FSDP plugin needs 2 accelerators")
def test_accelerate_fsdp2_trains_refl(tmp_path):  # pragma: no cover - GPU only
    env = {k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"}}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "recipes" / "accelerate" / "fsdp2_8gpu.yaml"),
           "--num_processes", "2", "--fsdp_transformer_layer_cls_to_wrap", "JointTransformerBlock",
           "-m", "dinalrm_align.train", str(REPO / "recipes" / "tiny_refl.yaml"), f"run_dir={tmp_path / 'run'}", *REFL]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
