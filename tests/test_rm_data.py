"""Latent pair shards, the bucket index, the bucketed sampler and preprocessing from images."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinalrm_align.rm_training.data import (
    BucketBatchSampler,
    PairDataset,
    PairRecord,
    build_index,
    latent_from_bytes,
    latent_to_bytes,
    min_votes_filter,
    write_shard,
)
from dinalrm_align.rm_training.preprocess import (
    SD3_BUCKETS,
    PreprocessOptions,
    assign_bucket,
    load_pixels,
    pair_bucket,
    parse_buckets,
    plan_pairs,
    preprocess,
    read_pairs,
    scale_buckets,
)


def _records(n: int, h: int, w: int, seed: int = 0, votes: bool = True) -> list[PairRecord]:
    rng = np.random.default_rng(seed)
    return [
        PairRecord(
            prompt=f"prompt {seed}-{i}",
            chosen=rng.standard_normal((16, h, w)).astype(np.float32),
            rejected=rng.standard_normal((16, h, w)).astype(np.float32),
            votes_chosen=(i % 5) if votes else None,
            votes_rejected=1 if votes else None,
            height=2 * h,
            width=2 * w,
        )
        for i in range(n)
    ]


def test_latent_bytes_roundtrip_and_npy():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    buf, shape = latent_to_bytes(x)
    np.testing.assert_array_equal(latent_from_bytes(buf, shape), x)
    npy = io.BytesIO()
    np.save(npy, x)
    np.testing.assert_array_equal(latent_from_bytes(npy.getvalue(), None), x)
    with pytest.raises(ValueError, match="bytes"):
        latent_from_bytes(buf[:-4], shape)


def test_shards_index_and_dataset(tmp_path):
    write_shard(tmp_path / "part_00000.parquet", _records(5, 8, 8, seed=0))
    write_shard(tmp_path / "part_00001.parquet", _records(3, 8, 12, seed=1, votes=False))
    index = build_index(tmp_path)
    assert len(index) == 8 and (tmp_path / "index.csv").is_file()
    assert {k: len(v) for k, v in index.buckets().items()} == {(8, 8): 5, (8, 12): 3}
    assert list(index.votes_chosen[5:]) == [-1, -1, -1]
    cached = build_index(tmp_path)  # from index.csv
    np.testing.assert_array_equal(cached.row, index.row)
    ds = PairDataset(index)
    prompt, chosen, rejected = ds.record(6)
    expected = _records(3, 8, 12, seed=1)[1]
    assert prompt == expected.prompt
    np.testing.assert_array_equal(chosen, expected.chosen)
    batch = ds.batch([0, 1, 2])
    assert batch.chosen.shape == (3, 16, 8, 8) and batch.prompts[2] == "prompt 0-2"
    with pytest.raises(ValueError, match="share a latent size"):
        ds.batch([0, 6])
    kept = index.filter(min_votes_filter(2))
    assert len(kept) == 3 + 3  # votes 2, 3, 4 + three unknown
    train, held = index.split(2, seed=0)
    assert len(train) == 6 and len(held) == 2


def test_index_rebuilds_when_shards_change(tmp_path):
    write_shard(tmp_path / "part_00000.parquet", _records(2, 4, 4))
    assert len(build_index(tmp_path)) == 2
    write_shard(tmp_path / "part_00001.parquet", _records(3, 4, 4, seed=2))
    assert len(build_index(tmp_path)) == 5


def _index(tmp_path, sizes):
    for i, (n, h, w) in enumerate(sizes):
        write_shard(tmp_path / f"part_{i:05d}.parquet", _records(n, h, w, seed=i))
    return build_index(tmp_path)


def test_sampler_single_bucket_batches_epochs_and_sharding(tmp_path):
    index = _index(tmp_path, [(10, 4, 4), (7, 4, 8)])
    heights = index.height * 100 + index.width
    s0 = BucketBatchSampler(index, 2, num_processes=2, rank=0, seed=3)
    s1 = BucketBatchSampler(index, 2, num_processes=2, rank=1, seed=3)
    assert s0.batches_per_epoch() == 10 // 4 + 7 // 4 == 3
    seen = []
    for _ in range(3):
        a, b = s0.next_batch(), s1.next_batch()
        assert len(a) == len(b) == 2
        assert len(set(heights[a + b])) == 1  # one bucket per global batch
        assert not set(a) & set(b)  # processes get different pairs
        seen += a + b
    assert len(set(seen)) == 12  # no pair twice within an epoch; remainders dropped
    epoch0 = seen
    epoch1 = []
    for _ in range(3):
        epoch1 += s0.next_batch() + s1.next_batch()
    assert s0.epoch == 1 and epoch1 != epoch0  # reshuffled


def test_sampler_resume(tmp_path):
    index = _index(tmp_path, [(9, 4, 4)])
    s = BucketBatchSampler(index, 2, seed=1)
    for _ in range(5):
        s.next_batch()
    state = s.state_dict()
    expected = [s.next_batch() for _ in range(4)]
    r = BucketBatchSampler(index, 2, seed=1)
    r.load_state_dict(state)
    assert [r.next_batch() for _ in range(4)] == expected
    with pytest.raises(ValueError, match="full global batch"):
        BucketBatchSampler(index, 10)


# ---------------------------------------------------------------------------------------- buckets
def test_bucket_assignment_rules():
    assert assign_bucket(1000, 1000, SD3_BUCKETS) == (1024, 1024)
    assert assign_bucket(300, 295, SD3_BUCKETS) == (256, 256)  # AR within 3 %, closest area
    assert assign_bucket(300, 290, SD3_BUCKETS) is None  # |log AR| = 0.034 > 0.03
    assert assign_bucket(1248, 832, SD3_BUCKETS) == (1248, 832)
    assert assign_bucket(1000, 500, SD3_BUCKETS) is None  # AR 2:1 fits nothing
    assert pair_bucket((1000, 1000), (1010, 1000), SD3_BUCKETS) == ((1024, 1024), "")
    # different buckets, same AR -> the smaller is upscaled, min of the sizes re-bucketed
    bucket, reason = pair_bucket((520, 512), (1024, 1024), SD3_BUCKETS)
    assert bucket == (1024, 1024) and reason == ""
    assert pair_bucket((1024, 768), (1024, 1024), SD3_BUCKETS) == (None, "bucket_mismatch")
    assert pair_bucket((1000, 500), (512, 512), SD3_BUCKETS) == (None, "no_bucket")
    assert parse_buckets("64x64, 96x64") == [(64, 64), (96, 64)]
    assert scale_buckets([(256, 256), (1248, 832)], 0.25, multiple=4) == [(64, 64), (312, 208)]
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_buckets("64by64")


# ---------------------------------------------------------------------------------------- preprocess
def _png(path, h, w, color):
    Image.new("RGB", (w, h), color).save(path)
    return path.name


@pytest.fixture()
def image_pairs(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    rows = [
        {"prompt": "a red cube", "chosen_path": _png(d / "a.png", 64, 64, (255, 0, 0)),
         "rejected_path": _png(d / "b.png", 70, 68, (0, 0, 255)), "votes_chosen": 3, "votes_rejected": 1},
        {"prompt": "a blue ball", "chosen_path": _png(d / "c.png", 64, 48, (0, 0, 255)),
         "rejected_path": _png(d / "e.png", 128, 96, (9, 9, 9))},
        {"prompt": "tiny", "chosen_path": _png(d / "f.png", 16, 16, (1, 2, 3)), "rejected_path": "a.png"},
        {"prompt": "gone", "chosen_path": "missing.png", "rejected_path": "a.png"},
        {"prompt": "mismatch", "chosen_path": "a.png", "rejected_path": "c.png"},
        {"prompt": "odd", "chosen_path": _png(d / "g.png", 64, 160, (5, 5, 5)), "rejected_path": "a.png"},
    ]
    src = d / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    return src


TINY_BUCKETS = [(64, 64), (64, 48), (48, 64)]


def test_plan_reasons(image_pairs):
    pairs = read_pairs(image_pairs, "jsonl")
    plan = plan_pairs(pairs, TINY_BUCKETS, min_size=32)
    assert [p.pair.prompt for p in plan.kept] == ["a red cube", "a blue ball"]
    assert [p.bucket for p in plan.kept] == [(64, 64), (64, 48)]
    assert plan.reasons() == {"too_small": 1, "missing_file": 1, "bucket_mismatch": 1, "no_bucket": 1}


def test_preprocess_writes_shards_and_resumes(image_pairs, tmp_path, tiny_pipe):
    out = tmp_path / "shards"
    opts = PreprocessOptions(
        source=str(image_pairs), output=str(out), vae="tiny", buckets=TINY_BUCKETS, min_size=32,
        shard_size=1, batch_size=4, progress=False,
    )
    summary = preprocess(opts)
    assert summary["kept_pairs"] == 2 and summary["dropped_pairs"] == 4 and summary["num_shards"] == 2
    assert json.loads((out / "summary.json").read_text())["dropped_by_reason"]["too_small"] == 1
    assert len((out / "dropped.jsonl").read_text().splitlines()) == 4
    ds = PairDataset.from_source(out)
    batch = ds.batch([0])
    assert batch.chosen.shape == (1, 16, 32, 32) and int(batch.votes_chosen[0]) == 3
    assert ds.batch([1]).chosen.shape == (1, 16, 32, 24)
    # chosen latent = tiny VAE posterior sample of the (resized) image, SD3-normalised, seeded per shard
    vae = tiny_pipe.vae
    pixels = torch.stack([load_pixels(str(image_pairs.parent / n), (64, 64)) for n in ("a.png", "b.png")])
    assert torch.allclose(pixels[0, 0], torch.ones(64, 64)) and torch.allclose(pixels[0, 1], -torch.ones(64, 64))
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
    expected = (dist.mean + dist.std * eps - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(batch.chosen[0], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.rejected[0], expected[1], atol=1e-4, rtol=1e-4)
    first = (out / "part_00000.parquet").stat().st_mtime_ns
    (out / "part_00001.parquet").unlink()
    again = preprocess(opts)
    assert again["shards_skipped_existing"] == 1
    assert (out / "part_00000.parquet").stat().st_mtime_ns == first
    np.testing.assert_array_equal(PairDataset.from_source(out).batch([1]).chosen.numpy(), ds.batch([1]).chosen.numpy())


def test_read_hpdv3_and_pickapic_layouts(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    rows = [{"prompt": "p", "path1": "x.png", "path2": "y.png", "choice_dist": [1, 4]}]
    src = tmp_path / "train.json"
    src.write_text(json.dumps(rows))
    (pair,) = read_pairs(src, "hpdv3")
    assert pair.chosen.endswith("y.png") and (pair.votes_chosen, pair.votes_rejected) == (4, 1)
    import pyarrow as pa
    import pyarrow.parquet as pq

    def jpg(color):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), color).save(buf, format="JPEG")
        return buf.getvalue()

    table = pa.table({
        "caption": ["a", "b"], "jpg_0": [jpg((0, 0, 0)), jpg((1, 1, 1))], "jpg_1": [jpg((9, 9, 9)), jpg((7, 7, 7))],
        "label_0": [0.0, 0.5], "label_1": [1.0, 0.5],
    })
    pq.write_table(table, tmp_path / "pick.parquet")
    pairs = read_pairs(tmp_path / "pick.parquet", "pickapic")
    assert pairs[0].chosen == table.column("jpg_1")[0].as_py() and pairs[1].drop_reason == "tie"
    plan = plan_pairs(pairs, [(40, 40)], min_size=32)
    assert len(plan.kept) == 1 and plan.reasons() == {"tie": 1}
    with pytest.raises(ValueError, match="valid layouts"):
        read_pairs(src, "laion")
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "nope.jsonl")
