"""Preference images on disk -> latent pair shards (``dinalrm-align preprocess``).

Steps: read the pairs (:mod:`.pair_sources`); read both image headers; drop
pairs with an image smaller than ``min_size`` on a side; assign a shared aspect-ratio bucket
(:mod:`.buckets`); Lanczos resize to the bucket, [-1, 1], VAE posterior sample,
``(z - shift) * scale`` (:mod:`.latent_encoding`); write parquet shards (:mod:`.data`).

Bad images never stop the run: every read happens in a reader process with a time limit
(:mod:`.image_workers`); a missing file drops its pair (``dropped.jsonl``), an unreadable,
truncated, too large (``max_pixels``) or timed-out image skips its pair with a warning
(``skipped.jsonl``: one line per pair naming the image and the reason). ``summary.json`` counts both.

Resumable: shards are numbered by their position in the (deterministic) plan; a shard that is
complete (``shard_status/part_XXXXX.json`` + its parquet file) is not encoded again. The first run
stores what determines the output in ``preprocess_params.json`` (input, layout, VAE, dtype,
buckets, sizes, seed, and a fingerprint of the planned pairs); a later run into the same folder
with anything different is refused instead of mixing shards. Shards are written to a temp folder
and renamed into place when complete; the temp folder is removed when a run fails, and left-overs
of a killed run are removed at the next start. One run per output folder at a time; several
processes of one run (``accelerate launch``) split the shards round-robin.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.atomic import write_atomic
from dinalrm_align.rm_training.buckets import (
    SD3_BUCKETS,
    assign_bucket,
    pair_bucket,
    parse_buckets,
    scale_buckets,
)
from dinalrm_align.rm_training.data import write_shard
from dinalrm_align.rm_training.image_io import DEFAULT_MAX_PIXELS, ImageFault
from dinalrm_align.rm_training.image_workers import ImageReaders
from dinalrm_align.rm_training.latent_encoding import (
    SIDES,
    PlannedPair,
    encode_shard,
    load_pixels,
    load_vae,
    skip_record,
)
from dinalrm_align.rm_training.pair_sources import LAYOUTS, PairInput, read_pairs

__all__ = [
    "LAYOUTS", "SD3_BUCKETS", "PairInput", "Plan", "PlannedPair", "PreprocessOptions", "assign_bucket",
    "encode_shard", "format_summary", "load_pixels", "pair_bucket", "parse_buckets", "plan_pairs",
    "preprocess", "read_pairs", "scale_buckets",
]

PARAMS_FILE = "preprocess_params.json"
PARAMS_FORMAT = "dinalrm-align/preprocess-v1"
STATUS_DIR = "shard_status"
TMP_PREFIX = ".preprocess-tmp-"
_HINTS = {"buckets": "buckets (--buckets / --bucket-scale / --bucket-multiple)"}


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Kept pairs (in shard order), dropped ones ``(id, reason)`` and skipped ones (bad images)."""

    kept: list[PlannedPair] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def reasons(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.dropped))

    def buckets(self) -> dict[str, int]:
        return dict(Counter(f"{p.bucket[0]}x{p.bucket[1]}" for p in self.kept))

    def fingerprint(self) -> str:
        """sha256 of the kept pairs in order (ids, prompts, images, votes, buckets); image bytes hashed."""
        h = hashlib.sha256()
        for p in self.kept:
            refs = [r if isinstance(r, str) else hashlib.sha256(r).hexdigest() for r in (p.pair.chosen, p.pair.rejected)]
            row = [p.pair.id, p.pair.prompt, *refs, p.pair.votes_chosen, p.pair.votes_rejected, *p.bucket]
            h.update(json.dumps(row).encode() + b"\n")
        return h.hexdigest()


def plan_pairs(
    pairs: Sequence[PairInput],
    buckets: Sequence[tuple[int, int]],
    min_size: int = 256,
    progress: bool = False,
    readers: ImageReaders | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Plan:
    """Keep (with its bucket), drop (``tie``, ``empty_prompt``, ``missing_file``, ``too_small``,
    ``no_bucket``, ``bucket_mismatch``) or skip (an image ``unreadable``, ``truncated``, ``too_large``
    or ``timeout`` when reading its header) every pair. Headers are read by ``readers`` (default: here)."""
    from tqdm.auto import tqdm

    readers = readers if readers is not None else ImageReaders(workers=0, timeout=None, max_pixels=max_pixels)
    plan = Plan()
    todo = []
    for pair in pairs:
        if pair.drop_reason:
            plan.dropped.append((pair.id, pair.drop_reason))
        elif not pair.prompt.strip():
            plan.dropped.append((pair.id, "empty_prompt"))
        else:
            todo.append(pair)
    bar = tqdm(total=len(todo), desc="reading image headers", disable=not progress, leave=False)
    for block in chunk(todo, 1024):
        sizes = readers.sizes([getattr(pair, side) for pair in block for side in SIDES])
        for k, pair in enumerate(block):
            got = sizes[2 * k : 2 * k + 2]
            faults = [(s, f) for s, f in zip(SIDES, got) if isinstance(f, ImageFault)]
            if any(f.reason == "missing_file" for _, f in faults):
                plan.dropped.append((pair.id, "missing_file"))
            elif faults:
                plan.skipped.append(skip_record(pair, faults, "header"))
            elif any(min(s) < min_size for s in got):
                plan.dropped.append((pair.id, "too_small"))
            else:
                bucket, reason = pair_bucket(got[0], got[1], buckets)
                if bucket is None:
                    plan.dropped.append((pair.id, reason))
                else:
                    plan.kept.append(PlannedPair(pair, bucket))
        bar.update(len(block))
    bar.close()
    return plan


def shard_name(i: int) -> str:
    return f"part_{i:05d}.parquet"


def chunk(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----------------------------------------------------------------------------------------------
# Options, stored parameters, files
# ----------------------------------------------------------------------------------------------


@dataclass
class PreprocessOptions:
    """Options of :func:`preprocess` (the CLI flags).

    ``image_timeout``: seconds one image read may take before its reader process is killed and the
    pair skipped (``None`` / 0: no limit). ``decode_workers``: reader processes per process of the
    run (0: read in this process, no time limit). ``max_pixels``: larger images are skipped.
    """

    source: str
    output: str
    layout: str = "jsonl"
    vae: str = "stabilityai/stable-diffusion-3.5-medium"
    image_root: str | None = None
    buckets: list[tuple[int, int]] = field(default_factory=lambda: list(SD3_BUCKETS))
    min_size: int = 256
    shard_size: int = 1000
    batch_size: int = 8
    seed: int = 0
    dtype: str = "fp32"
    progress: bool = True
    image_timeout: float | None = 60.0
    decode_workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS


def run_params(options: PreprocessOptions) -> dict[str, Any]:
    """Everything that determines the shards' content (not the number of processes or readers)."""
    return {
        "source": str(Path(options.source).resolve()),
        "layout": options.layout,
        "image_root": str(Path(options.image_root).resolve()) if options.image_root else None,
        "vae": options.vae,
        "dtype": options.dtype,
        "buckets": [f"{h}x{w}" for h, w in options.buckets],
        "min_size": options.min_size,
        "max_pixels": options.max_pixels,
        "shard_size": options.shard_size,
        "batch_size": options.batch_size,
        "seed": options.seed,
    }


def check_params(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The parameters stored in ``out`` (``None`` for a fresh folder); ValueError when they differ
    from ``params`` (keys present in both) or when ``out`` holds shards of an unknown run."""
    file = out / PARAMS_FILE
    if not file.is_file():
        if any(out.glob("part_*.parquet")):
            raise ValueError(
                f"{out} already holds part_*.parquet shards but no {PARAMS_FILE} (another tool or an older "
                "version wrote them): resuming could mix different data; use a new --out folder"
            )
        return None
    try:
        stored = json.loads(file.read_text())["params"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{file} is damaged ({exc}); use a new --out folder") from exc
    differing = [k for k in params if k in stored and stored[k] != params[k]]
    if differing:
        k = differing[0]
        more = f" (also differing: {', '.join(differing[1:])})" if differing[1:] else ""
        if k == "plan":
            what = (
                f"the input pairs changed since the first run ({stored[k].get('kept_pairs')} pairs planned then, "
                f"{params[k]['kept_pairs']} now, different fingerprint: the input changed, or an image skipped "
                "then reads now or the other way round)"
            )
        else:
            what = f"it was written with {_HINTS.get(k, k)} = {json.dumps(stored[k])}, this run has {json.dumps(params[k])}"
        raise ValueError(
            f"cannot resume in {out}: {what}{more}; rerun with the earlier value or use a new --out folder"
        )
    return stored


def _remove_leftovers(out: Path) -> None:
    """Temp files of killed runs: this module's temp folders/files and ``.tmp_*`` shards of :func:`write_shard`."""
    for path in [*out.glob(f"{TMP_PREFIX}*"), *out.glob(".tmp_*.parquet"), *(out / STATUS_DIR).glob(f"{TMP_PREFIX}*")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _read_status(out: Path, i: int) -> dict[str, Any] | None:
    """The status of a complete shard, ``None`` if shard ``i`` still has to be encoded."""
    try:
        status = json.loads((out / STATUS_DIR / f"{Path(shard_name(i)).stem}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return status if status.get("rows") == 0 or (out / shard_name(i)).is_file() else None


def _encode_shards(options: PreprocessOptions, shards: list, todo: list[int], out: Path, accelerator: Any) -> None:
    """Encode and write the shards ``todo`` (this process), each through a temp folder."""
    from tqdm.auto import tqdm

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[options.dtype]
    vae = load_vae(options.vae, dtype).to(accelerator.device)
    bar = tqdm(
        total=sum(len(shards[i]) for i in todo), desc=f"encoding (rank {accelerator.process_index})",
        unit="pair", disable=not options.progress,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{accelerator.process_index}-", dir=out))
    try:
        with ImageReaders(options.decode_workers, options.image_timeout, options.max_pixels) as readers:
            for i in todo:
                seed = options.seed * 1_000_003 + i
                records, skipped = encode_shard(vae, shards[i], options.batch_size, seed, options.layout, readers)
                if records:  # complete shard -> renamed into place, then its status marks it done
                    os.replace(write_shard(tmp / shard_name(i), records), out / shard_name(i))
                status = {"shard": i, "rows": len(records), "skipped": skipped,
                          "buckets": dict(Counter(f"{r.height}x{r.width}" for r in records))}
                write_atomic(out / STATUS_DIR / f"{Path(shard_name(i)).stem}.json", json.dumps(status))
                bar.update(len(shards[i]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        bar.close()


# ----------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------


def preprocess(options: PreprocessOptions, accelerator: Any = None) -> dict[str, Any]:
    """Run the whole preprocessing; returns (and writes, main process) the summary."""
    if options.shard_size < 1 or options.batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    if options.decode_workers < 0 or options.max_pixels < 1:
        raise ValueError("decode_workers must be >= 0 and max_pixels >= 1")
    if options.decode_workers == 0 and options.image_timeout:
        raise ValueError("a time limit per image (image_timeout) needs decode_workers >= 1")
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    out = Path(options.output)
    out.mkdir(parents=True, exist_ok=True)
    params = run_params(options)
    stored = check_params(out, params)
    pairs = read_pairs(options.source, options.layout, options.image_root)
    with ImageReaders(options.decode_workers, options.image_timeout, options.max_pixels) as readers:
        plan = plan_pairs(pairs, options.buckets, options.min_size, options.progress and main, readers)
    params["plan"] = {"kept_pairs": len(plan.kept), "sha256": plan.fingerprint()}
    check_params(out, params)
    if main:
        _remove_leftovers(out)
        (out / STATUS_DIR).mkdir(exist_ok=True)
        if stored is None:
            write_atomic(out / PARAMS_FILE, json.dumps({"format": PARAMS_FORMAT, "params": params}, indent=2))
    accelerator.wait_for_everyone()
    shards = list(chunk(plan.kept, options.shard_size))
    mine = [i for i in range(len(shards)) if i % accelerator.num_processes == accelerator.process_index]
    todo = [i for i in mine if _read_status(out, i) is None]
    existing = len(mine) - len(todo)
    if todo:
        _encode_shards(options, shards, todo, out, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        existing = int(accelerator.reduce(torch.tensor(existing, device=accelerator.device), reduction="sum").item())
    statuses = [_read_status(out, i) or {"rows": 0, "skipped": [], "buckets": {}} for i in range(len(shards))]
    skipped = plan.skipped + [s for st in statuses for s in st["skipped"]]
    per_bucket: Counter = Counter()
    for st in statuses:
        per_bucket.update(st["buckets"])
    summary = {
        "source": str(options.source),
        "layout": options.layout,
        "output": str(out),
        "total_pairs": len(pairs),
        "kept_pairs": sum(st["rows"] for st in statuses),
        "dropped_pairs": len(plan.dropped),
        "dropped_by_reason": plan.reasons(),
        "skipped_pairs": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "pairs_per_bucket": dict(per_bucket),
        "num_shards": len(shards),
        "shards_skipped_existing": existing,
        "min_size": options.min_size,
        "max_pixels": options.max_pixels,
        "buckets": [f"{h}x{w}" for h, w in options.buckets],
    }
    if main:
        write_atomic(out / "summary.json", json.dumps(summary, indent=2))
        write_atomic(out / "dropped.jsonl", "".join(json.dumps({"id": i, "reason": r}) + "\n" for i, r in plan.dropped))
        write_atomic(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for the end of a run."""
    lines = [
        f"pairs: {summary['total_pairs']} read, {summary['kept_pairs']} kept, {summary['dropped_pairs']} dropped, "
        f"{summary.get('skipped_pairs', 0)} skipped (bad images)",
    ]
    for reason, count in sorted(summary["dropped_by_reason"].items()):
        lines.append(f"  dropped ({reason}): {count}")
    for reason, count in sorted(summary.get("skipped_by_reason", {}).items()):
        lines.append(f"  skipped ({reason}): {count}")
    if summary.get("skipped_pairs"):
        lines.append(f"  skipped pairs and why: {Path(summary['output']) / 'skipped.jsonl'}")
    for bucket, count in sorted(summary["pairs_per_bucket"].items()):
        lines.append(f"  bucket {bucket}: {count}")
    lines.append(
        f"shards: {summary['num_shards']} in {summary['output']} ({summary['shards_skipped_existing']} already there)"
    )
    return "\n".join(lines)
