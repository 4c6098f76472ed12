"""Tracking: a wandb offline run folder holds the logged keys and the config; tensorboard and the
metrics.jsonl fallback work."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_refl.yaml"
PROMPTS = REPO / "recipes" / "prompts" / "tiny_prompts.txt"
FAST = [
    "sampling.num_steps=4",
    "algorithm.k_min=2",
    "algorithm.k_max=3",
    "eval.num_steps=4",
    "train.batch_size=2",
]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def read_wandb_records(path: Path) -> list[bytes]:
    """Payloads of a ``run-*.wandb`` file (LevelDB-style log: 7-byte file header, 32 KiB blocks,
    records framed as crc32 (4) + length (2) + type (1: full, 2: first, 3: middle, 4: last))."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, out, buf = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            pos += left - 7
            continue
        data, pos = raw[pos : pos + length], pos + length
        if kind == 1:
            out.append(data)
        elif kind == 2:
            buf = data
        elif kind == 3:
            buf += data
        elif kind == 4:
            out.append(buf + data)
    return out


def wandb_keys(run_file: Path) -> tuple[set[str], set[str]]:
    """(history keys, top-level config keys) of an offline wandb run."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, config = set(), set()
    for payload in read_wandb_records(run_file):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        elif kind == "config":
            config |= {i.key or "/".join(i.nested_key) for i in record.config.update}
    return history, config


def test_wandb_offline_run_folder_has_logged_keys(tmp_path, monkeypatch):
    from dinalrm_align.trainer.config import load_train_config
    from dinalrm_align.trainer.loop import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    cfg = load_train_config(
        TINY,
        [
            f"data.prompts={PROMPTS}",
            f"run_dir={tmp_path / 'run'}",
            *FAST,
            "train.max_steps=2",
            "tracking.log_with=wandb",
            "tracking.run_name=tiny-test",
            "tracking.tags=[tiny, test]",
            "checkpoint.every=0",
        ],
    )
    Trainer(cfg).train()
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_file = next(runs[0].glob("run-*.wandb"))
    history, config = wandb_keys(run_file)
    deadline = time.monotonic() + 30.0
    while not history and time.monotonic() < deadline:  # wandb-core may still be flushing under load
        time.sleep(0.5)
        history, config = wandb_keys(run_file)
    assert {
        "train/loss",
        "train/reward_raw_mean",
        "train/reward_raw_std",
        "train/reward_norm_mean",
        "train/reward_norm_std",
        "train/grad_norm",
        "train/lr",
        "train/k",
        "train/sigma_k",
        "perf/samples_per_s",
        "perf/step_time_s",
        "perf/peak_mem_gb",
        "eval/reward_raw",
        "eval/reward_norm",
    } <= history
    assert any(k.startswith("eval/samples") for k in history)
    assert {"algorithm", "model", "reward", "train", "optim"} <= config
    assert list(runs[0].glob("files/media/images/eval/*.png"))


def test_tensorboard_and_metrics_file(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dinalrm_align.trainer.accelerator import build_accelerator
    from dinalrm_align.trainer.config import TrackingConfig
    from dinalrm_align.trainer.tracking import Tracker, read_metrics

    acc = build_accelerator(
        mixed_precision="no", gradient_accumulation_steps=1, run_dir=tmp_path, log_with="tensorboard"
    )
    tracker = Tracker(acc, TrackingConfig(log_with="tensorboard", project="tb-test"), tmp_path)
    tracker.start({"train": {"lr": 0.1, "tags": ["a"]}, "seed": 1})
    tracker.log({"train/loss": torch.tensor(0.5), "eval/reward_raw": 1.5}, step=3)
    tracker.log_image("eval/samples", Image.new("RGB", (8, 4), (255, 0, 0)), step=3, caption="x")
    tracker.finish()
    events = list((tmp_path / "logs" / "tb-test").glob("events.out.tfevents.*"))
    assert events
    ea = EventAccumulator(str(events[0].parent))
    ea.Reload()
    assert {"train/loss", "eval/reward_raw"} <= set(ea.Tags()["scalars"])
    assert "eval/samples" in ea.Tags()["images"]
    assert read_metrics(tmp_path) == [{"step": 3, "train/loss": 0.5, "eval/reward_raw": 1.5}]
