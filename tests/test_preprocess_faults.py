"""``dinalrm-align preprocess`` with bad images, interrupted runs and resumes with other parameters."""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dinalrm_align.rm_training import preprocess as pp
from dinalrm_align.rm_training.cli import preprocess_main
from dinalrm_align.rm_training.data import PairDataset, list_shards
from dinalrm_align.rm_training.image_io import ImageFault
from dinalrm_align.rm_training.image_workers import ImageReaders
from dinalrm_align.rm_training.preprocess import PreprocessOptions, load_pixels, preprocess

BUCKETS = [(64, 64), (64, 48)]


def _noise_png(path: Path, h: int = 64, w: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _truncated_png(path: Path) -> Path:
    data = _noise_png(path, seed=9).read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, half of the pixel data missing
    return path


def _bomb_png(path: Path, width: int = 30_000, height: int = 30_000) -> Path:
    """A tiny file whose IHDR declares ``width x height`` pixels (a decompression bomb)."""
    data = bytearray(_noise_png(path, 8, 8).read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _write_pairs(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "chosen_path": c, "rejected_path": r}) + "\n" for p, c, r in rows))
    return path


def _options(src: Path, out: Path, **kw) -> PreprocessOptions:
    base = dict(source=str(src), output=str(out), vae="tiny", buckets=BUCKETS, min_size=32, shard_size=2,
                batch_size=4, progress=False, decode_workers=1, image_timeout=60.0)
    base.update(kw)
    return PreprocessOptions(**base)


def _run_with_deadline(fn, seconds: float = 180.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not finish in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a read is stuck"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture()
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i, name in enumerate("abcd"):
        _noise_png(d / f"{name}.png", seed=i)
    _noise_png(d / "wide.png", 64, 48, seed=5)
    _truncated_png(d / "truncated.png")
    _bomb_png(d / "bomb.png")
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(3).bytes(64))
    return d


# ---------------------------------------------------------------------------------------- bad images
def test_bad_images_skip_their_pair_and_are_listed(images, tmp_path, caplog, capsys):
    src = _write_pairs(images / "pairs.jsonl", [
        ("good one", "a.png", "b.png"),
        ("truncated", "truncated.png", "c.png"),
        ("bomb", "d.png", "bomb.png"),
        ("garbage", "garbage.png", "a.png"),
        ("good two", "c.png", "d.png"),
        ("gone", "missing.png", "a.png"),
    ])
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="dinalrm_align.rm_training.preprocess"):
        code = _run_with_deadline(lambda: preprocess_main([
            str(src), "--out", str(out), "--vae", "tiny", "--buckets", "64x64", "--min-size", "32",
            "--shard-size", "2", "--quiet", "--decode-workers", "1",
        ]))
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped (truncated): 1" in printed and "skipped (too_large): 1" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept_pairs"] == 2 and summary["skipped_pairs"] == 3 and summary["dropped_pairs"] == 1
    assert summary["skipped_by_reason"] == {"truncated": 1, "too_large": 1, "unreadable": 1}
    assert summary["dropped_by_reason"] == {"missing_file": 1}
    skipped = {r["id"]: r for r in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert set(skipped) == {"1", "2", "3"}
    assert skipped["1"]["image"] == str(images / "truncated.png") and skipped["1"]["stage"] == "decode"
    assert skipped["1"]["side"] == "chosen" and "truncated" in skipped["1"]["detail"]
    assert skipped["2"]["image"] == str(images / "bomb.png") and skipped["2"]["reason"] == "too_large"
    assert skipped["2"]["side"] == "rejected" and "30000x30000" in skipped["2"]["detail"]
    assert skipped["3"]["reason"] == "unreadable" and skipped["3"]["stage"] == "header"
    assert sum("truncated.png" in r.getMessage() for r in caplog.records) == 1
    ds = PairDataset.from_source(out)
    assert len(ds) == 2 and sorted(ds.record(i)[0] for i in range(2)) == ["good one", "good two"]


def test_max_pixels_limit_skips_large_images(images, tmp_path):
    src = _write_pairs(images / "pairs.jsonl", [("square", "a.png", "b.png"), ("wide", "wide.png", "wide.png")])
    summary = preprocess(_options(src, tmp_path / "out", max_pixels=64 * 48))
    assert summary["kept_pairs"] == 1 and summary["skipped_by_reason"] == {"too_large": 1}
    record = json.loads((tmp_path / "out" / "skipped.jsonl").read_text())
    assert record["id"] == "0" and "over the limit of 3072" in record["detail"]
    assert len(record["faults"]) == 2  # both images of the pair are too large


def test_truncated_image_is_an_error_even_if_pillow_allows_truncated_images(images, monkeypatch):
    """Root cause guard: with LOAD_TRUNCATED_IMAGES on (some libraries set it), Pillow returns a
    truncated file as an image whose missing rows are grey, without any error."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(images / "truncated.png") as img:
        img.load()  # what happened before: no error at all
    with pytest.raises(ValueError, match=r"truncated\.png: truncated"):
        load_pixels(str(images / "truncated.png"), (64, 64))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored
    with ImageReaders(workers=1, timeout=60) as readers:
        (fault,) = readers.pixels([(str(images / "truncated.png"), (64, 64))])
    assert isinstance(fault, ImageFault) and fault.reason == "truncated"


# ---------------------------------------------------------------------------------------- time limit
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_time_limit_kills_a_read_that_never_returns(images, tmp_path):
    """Opening a named pipe without a writer blocks forever, like a read on a dead network mount."""
    stuck = tmp_path / "stuck.png"
    os.mkfifo(stuck)
    good = str(images / "a.png")
    with ImageReaders(workers=1, timeout=1.0) as readers:
        out = _run_with_deadline(lambda: readers.pixels([(good, (32, 32)), (str(stuck), (32, 32)), (good, (32, 32))]))
        assert out[0].shape == out[2].shape == (32, 32, 3) and np.array_equal(out[0], out[2])
        assert isinstance(out[1], ImageFault) and out[1].reason == "timeout"
        assert readers.restarts == 1
        sizes = _run_with_deadline(lambda: readers.sizes([str(stuck), good]))
        assert isinstance(sizes[0], ImageFault) and sizes[0].reason == "timeout" and sizes[1] == (64, 64)
    src = _write_pairs(images / "pairs.jsonl", [("ok", "a.png", "b.png"), ("stuck", "c.png", str(stuck))])
    summary = _run_with_deadline(lambda: preprocess(_options(src, tmp_path / "out", image_timeout=1.0)))
    assert summary["kept_pairs"] == 1 and summary["skipped_by_reason"] == {"timeout": 1}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_crashed_reader_costs_one_image(images, tmp_path):
    stuck = tmp_path / "stuck.png"
    os.mkfifo(stuck)
    with ImageReaders(workers=1, timeout=None) as readers:
        readers.sizes([str(images / "a.png")])  # starts the reader
        killer = threading.Timer(0.5, readers._readers[0].proc.kill)
        killer.start()
        out = _run_with_deadline(lambda: readers.sizes([str(stuck), str(images / "b.png")]))
    assert isinstance(out[0], ImageFault) and out[0].reason == "reader_crashed" and out[1] == (64, 64)


def test_reader_processes_give_the_same_shards_as_reading_in_process(images, tmp_path):
    src = _write_pairs(images / "pairs.jsonl", [("p0", "a.png", "b.png"), ("p1", "wide.png", "wide.png"),
                                                ("p2", "c.png", "d.png")])
    preprocess(_options(src, tmp_path / "workers", decode_workers=2, batch_size=3))
    preprocess(_options(src, tmp_path / "local", decode_workers=0, image_timeout=None, batch_size=3))
    a, b = PairDataset.from_source(tmp_path / "workers"), PairDataset.from_source(tmp_path / "local")
    assert len(a) == len(b) == 3
    for i in range(3):
        np.testing.assert_array_equal(a.record(i)[1], b.record(i)[1])
        np.testing.assert_array_equal(a.record(i)[2], b.record(i)[2])


# ---------------------------------------------------------------------------------------- resume
def test_resume_with_different_parameters_is_refused(images, tmp_path, capsys):
    src = _write_pairs(images / "pairs.jsonl", [("p0", "a.png", "b.png"), ("p1", "c.png", "d.png"),
                                                ("p2", "b.png", "c.png")])
    out = tmp_path / "out"
    first = preprocess(_options(src, out))
    assert first["kept_pairs"] == 3 and (out / "preprocess_params.json").is_file()
    before = {p.name: p.read_bytes() for p in list_shards(out)}
    for change, name in (({"vae": "tiny:1"}, "vae"), ({"dtype": "bf16"}, "dtype"),
                         ({"buckets": [(64, 64)]}, "buckets"), ({"seed": 1}, "seed"),
                         ({"shard_size": 3}, "shard_size"), ({"min_size": 16}, "min_size")):
        with pytest.raises(ValueError, match=f"cannot resume in .*{name}") as info:
            preprocess(_options(src, out, **change))
        assert "\n" not in str(info.value)
    args = [str(src), "--out", str(out), "--vae", "tiny", "--buckets", "64x64,64x48", "--min-size", "32",
            "--shard-size", "2", "--batch-size", "4", "--quiet", "--decode-workers", "1"]
    assert preprocess_main([*args, "--bucket-scale", "0.5", "--bucket-multiple", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinalrm-align preprocess: error: cannot resume") and "--bucket-scale" in err
    assert len(err.splitlines()) == 1
    _write_pairs(src, [("p0", "a.png", "b.png"), ("new", "d.png", "a.png"), ("p1", "c.png", "d.png")])
    with pytest.raises(ValueError, match="input pairs changed"):
        preprocess(_options(src, out))
    assert {p.name: p.read_bytes() for p in list_shards(out)} == before  # nothing appended or rewritten
    _write_pairs(src, [("p0", "a.png", "b.png"), ("p1", "c.png", "d.png"), ("p2", "b.png", "c.png")])
    assert preprocess_main(args) == 0  # same parameters (CLI spelling): resumes
    again = json.loads((out / "summary.json").read_text())
    assert again["shards_skipped_existing"] == 2 and again["kept_pairs"] == 3 and len(PairDataset.from_source(out)) == 3


def test_shards_of_an_unknown_run_are_not_mixed(images, tmp_path):
    src = _write_pairs(images / "pairs.jsonl", [("p0", "a.png", "b.png")])
    out = tmp_path / "out"
    preprocess(_options(src, out))
    (out / "preprocess_params.json").unlink()
    with pytest.raises(ValueError, match="no preprocess_params.json"):
        preprocess(_options(src, out))


# ---------------------------------------------------------------------------------------- temp files
def test_failed_run_leaves_no_partial_shard_and_resumes(images, tmp_path, monkeypatch):
    src = _write_pairs(images / "pairs.jsonl", [("p0", "a.png", "b.png"), ("p1", "c.png", "d.png"),
                                                ("p2", "b.png", "c.png"), ("p3", "d.png", "a.png")])
    out = tmp_path / "out"
    real = pp.write_shard
    calls = []

    def fail_second(path, records):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"PAR1 half a shard")  # what a crash mid-write leaves
            raise OSError(28, "No space left on device")
        return real(path, records)

    monkeypatch.setattr(pp, "write_shard", fail_second)
    with pytest.raises(OSError, match="No space"):
        preprocess(_options(src, out, shard_size=1))
    monkeypatch.undo()
    assert [p.name for p in list_shards(out)] == ["part_00000.parquet"]
    assert not list(out.glob(".*")) and not list((out / "shard_status").glob(".*"))
    # leftovers of a killed run (temp folder, a temp shard of an older writer) are ignored, then removed
    (out / ".preprocess-tmp-0-killed").mkdir()
    (out / ".preprocess-tmp-0-killed" / "part_00001.parquet").write_bytes(b"half")
    (out / ".tmp_123_part_00002.parquet").write_bytes(b"half")
    assert [p.name for p in list_shards(out)] == ["part_00000.parquet"]
    summary = preprocess(_options(src, out, shard_size=1))
    assert summary["shards_skipped_existing"] == 1 and summary["kept_pairs"] == 4
    assert not list(out.glob(".*"))
    prompts = sorted(PairDataset.from_source(out).record(i)[0] for i in range(4))
    assert prompts == ["p0", "p1", "p2", "p3"]
