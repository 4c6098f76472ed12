"""Tracking: a wandb offline run folder holds the logged keys, the config, the eval grid and table;
tensorboard gets scalars, the grid and a text table; metrics.jsonl never holds two rows of one step;
eval grids carry captions."""

from __future__ import annotations

import json
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


pytestmark = pytest.mark.usefixtures("fresh_trainer_state")


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
    Trainer(cfg, progress=False).train()
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
        "train/epoch",
        "train/ema_decay",
        "train/k",
        "train/sigma_k",
        "perf/step_time_s",
        "perf/peak_mem_gb",
        "eval/reward_raw",
        "eval/reward_norm",
    } <= history
    assert any(k.startswith("eval/samples") for k in history)  # the per-sample table
    assert any(k.startswith("eval/grid") for k in history)
    assert {"algorithm", "model", "reward", "train", "optim"} <= config
    assert list(runs[0].glob("files/media/images/eval/*.png"))
    tables = list(runs[0].glob("files/media/table/eval/*.table.json"))
    assert tables
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["prompt", "reward", "reward_norm"] and "image" in table["columns"]
    assert len(table["data"]) == 4  # one row per eval prompt


class FakeAccelerator:
    """What :class:`Tracker` uses of an accelerator, recording what the tracker receives."""

    is_main_process = True

    def __init__(self, writer) -> None:
        self.writer = writer
        self.logged: list[tuple[dict, int]] = []

    def init_trackers(self, project, config=None, init_kwargs=None) -> None:
        self.project, self.config = project, config

    def get_tracker(self, name, unwrap=False):
        assert name == "tensorboard" and unwrap
        return self.writer

    def log(self, values, step=None) -> None:
        self.logged.append((values, step))

    def end_training(self) -> None:
        pass


class FakeWriter:
    def __init__(self) -> None:
        self.images, self.texts = [], []

    def add_image(self, tag, array, global_step=None, dataformats="CHW") -> None:
        self.images.append((tag, array.shape, global_step, dataformats))

    def add_text(self, tag, text, global_step=None) -> None:
        self.texts.append((tag, text, global_step))

    def flush(self) -> None:
        pass


def test_log_eval_gives_tensorboard_a_grid_and_a_markdown_table(tmp_path):
    from PIL import Image

    from dinalrm_align.trainer.config import TrackingConfig
    from dinalrm_align.trainer.tracking import Tracker

    writer = FakeWriter()
    acc = FakeAccelerator(writer)
    tracker = Tracker(acc, TrackingConfig(log_with="tensorboard", project="p"), tmp_path)
    table = [{"prompt": "a red | cube", "reward": 0.5, "reward_norm": 1.05, "image": Image.new("RGB", (4, 4))},
             {"prompt": "a cat", "reward": -1.25, "reward_norm": 0.875, "image": None}]
    tracker.log_eval("eval", Image.new("RGB", (8, 6)), table, step=7, caption="x")
    assert writer.texts == []  # not started: nothing logged
    tracker.start({"seed": 1, "train": {"lr": 0.1}})
    assert acc.config == {"seed": 1, "train.lr": 0.1}  # tensorboard gets a flat config
    tracker.log_eval("eval", Image.new("RGB", (8, 6)), table, step=7, caption="x")
    assert writer.images == [("eval/grid", (6, 8, 3), 7, "HWC")]
    ((tag, text, step),) = writer.texts
    assert tag == "eval/samples" and step == 7
    lines = text.splitlines()
    assert lines[0] == "| prompt | reward | reward_norm |" and len(lines) == 4  # header, rule, 2 rows
    assert lines[2] == "| a red / cube | 0.5000 | 1.0500 |" and lines[3] == "| a cat | -1.2500 | 0.8750 |"


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
    tracker.log_eval("eval", Image.new("RGB", (8, 4), (255, 0, 0)), [{"prompt": "a red cube", "reward": 0.25}],
                     step=3, caption="x")
    tracker.finish()
    events = list((tmp_path / "logs" / "tb-test").glob("events.out.tfevents.*"))
    assert events
    ea = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"train/loss", "eval/reward_raw"} <= set(tags["scalars"])
    assert "eval/grid" in tags["images"]
    text_tags = [t for t in tags["tensors"] if t.startswith("eval/samples")]
    assert text_tags, tags["tensors"]  # the table as a text summary
    (event,) = ea.Tensors(text_tags[0])
    text = event.tensor_proto.string_val[0].decode()
    assert "| prompt | reward |" in text and "| a red cube | 0.2500 |" in text
    assert read_metrics(tmp_path) == [{"step": 3, "train/loss": 0.5, "eval/reward_raw": 1.5}]


def test_metrics_file_is_cut_back_to_the_resumed_step(tmp_path):
    from dinalrm_align.trainer.config import TrackingConfig
    from dinalrm_align.trainer.tracking import Tracker, read_metrics, truncate_metrics

    tracker = Tracker(FakeAccelerator(FakeWriter()), TrackingConfig(log_with="none"), tmp_path)
    tracker.start({})
    for step in (1, 2, 3, 4):
        tracker.log({"train/loss": float(step), "train/nan": float("nan")}, step=step)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "train/lo')  # the torn last line of a killed run
    tracker = Tracker(FakeAccelerator(FakeWriter()), TrackingConfig(log_with="none"), tmp_path)
    tracker.start({}, resumed_step=2)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["train/nan"] == "nan"
    tracker.log({"train/loss": 30.0}, step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert truncate_metrics(tmp_path / "metrics.jsonl", 5) == 0  # nothing after step 5: unchanged
    assert truncate_metrics(tmp_path / "metrics.jsonl", 0) == 3 and read_metrics(tmp_path) == []
    assert truncate_metrics(tmp_path / "absent.jsonl", 0) == 0


def test_captioned_grid_has_caption_rows():
    import numpy as np

    from dinalrm_align.trainer.grid import captioned_grid, make_grid

    images = [np.full((16, 16, 3), 40 * i, dtype=np.uint8) for i in range(5)]
    captions = [[f"prompt number {i} with a rather long description", f"reward {i:.3f}"] for i in range(5)]
    grid = captioned_grid(images, captions, columns=3, min_cell=64)
    plain = make_grid(images, 3)
    assert plain.size == (48, 32)  # 3 x 2 cells of 16 px, no captions
    cell = 64  # 16 px upscaled 4x
    assert grid.width == 3 * (cell + 4) + 4
    assert grid.height > 2 * cell + 3 * 4 + 2 * 24  # two rows of images plus at least two text lines each
    pixels = np.asarray(grid)
    caption_band = pixels[4 + cell + 2 : 4 + cell + 30, 4 : 4 + cell]  # under the first image
    assert (caption_band < 128).any() and (caption_band == 255).any()  # dark text on white
    top_left = pixels[4 : 4 + cell, 4 : 4 + cell]
    assert (top_left == 0).all()  # image 0 (black) upscaled into its cell
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        captioned_grid(images[:2], captions[:1], columns=2)
    with pytest.raises(ValueError, match="no images"):
        captioned_grid([], [], columns=2)
