"""Preference images on disk -> latent pair shards (``dinalrm-align preprocess``).

Steps (dina_lrm.md 4.1): read the pairs; drop pairs with an image smaller than ``min_size`` on a
side; assign both images to an aspect-ratio bucket (``|log AR_bucket - log AR_img| <= 0.03``, then
the closest log-area); pairs split over two buckets share one when their aspect ratios differ by
< 5 % (the smaller image is upscaled to the larger's long edge, the element-wise min of the two
sizes is re-bucketed), otherwise they are dropped; Lanczos resize to the bucket, [-1, 1], VAE
posterior sample, ``(z - shift) * scale``; write parquet shards (:mod:`.data`).

Input layouts:

- ``jsonl``: one object per line ``{"prompt", "chosen_path", "rejected_path"}`` with optional
  ``votes_chosen`` / ``votes_rejected``; relative paths are resolved against ``image_root``
  (default: the jsonl's folder).
- ``hpdv3``: HPDv3's ``train.json`` / ``test.json`` (a JSON list or jsonl) with ``prompt``,
  ``path1``, ``path2`` and optional ``choice_dist`` = [votes for path1, votes for path2]. ``path1``
  is taken as the preferred image unless ``choice_dist`` says otherwise (then the pair is swapped).
- ``pickapic``: Pick-a-Pic parquet files (one file or a folder) with ``caption``, ``jpg_0``,
  ``jpg_1`` (encoded image bytes) and ``label_0`` / ``label_1`` (1 = preferred; 0.5 each = tie, dropped).

Resumable: shards are numbered by their position in the (deterministic) plan; a shard file that
already exists is skipped. Several processes (``accelerate launch``) split the shards round-robin.
Every process encodes with its own accelerator device. A ``summary.json`` lists kept and
dropped pairs per reason; ``dropped.jsonl`` names every dropped pair.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinalrm_align.rm_training.data import PairRecord, write_shard

#: Aspect-ratio buckets of DiNa-LRM's training data as (height, width) in pixels (all divisible by 32).
SD3_BUCKETS: tuple[tuple[int, int], ...] = (
    (256, 256),
    (512, 512),
    (1024, 1024),
    (1248, 832),
    (1344, 896),
    (832, 1248),
    (896, 1344),
    (1024, 768),
    (768, 1024),
    (1472, 832),
    (832, 1472),
    (1152, 832),
    (832, 1152),
)
AR_TOLERANCE = 0.03
PAIR_AR_TOLERANCE = 0.05
LAYOUTS: tuple[str, ...] = ("jsonl", "hpdv3", "pickapic")


# ----------------------------------------------------------------------------------------------
# Buckets (pure)
# ----------------------------------------------------------------------------------------------


def parse_buckets(spec: str) -> list[tuple[int, int]]:
    """``"256x256,1248x832"`` (HxW) -> ``[(256, 256), (1248, 832)]``."""
    out = []
    for item in spec.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            h, w = (int(v) for v in item.split("x"))
        except ValueError as exc:
            raise ValueError(f"bucket {item!r} must look like HEIGHTxWIDTH, e.g. 1248x832") from exc
        if h <= 0 or w <= 0:
            raise ValueError(f"bucket {item!r} must have positive sides")
        out.append((h, w))
    if not out:
        raise ValueError(f"no buckets in {spec!r}")
    return out


def scale_buckets(buckets: Sequence[tuple[int, int]], scale: float, multiple: int = 1) -> list[tuple[int, int]]:
    """Scale every bucket by ``scale`` and round to a multiple of ``multiple`` (e.g. for tiny VAEs)."""
    out = []
    for h, w in buckets:
        sh = max(multiple, int(round(h * scale / multiple)) * multiple)
        sw = max(multiple, int(round(w * scale / multiple)) * multiple)
        if (sh, sw) not in out:
            out.append((sh, sw))
    return out


def assign_bucket(
    height: int, width: int, buckets: Sequence[tuple[int, int]], tolerance: float = AR_TOLERANCE
) -> tuple[int, int] | None:
    """Bucket of an image: aspect ratio within ``tolerance`` (log space), then the closest log-area."""
    if height <= 0 or width <= 0:
        return None
    log_ar = math.log(width / height)
    log_area = math.log(width * height)
    candidates = [b for b in buckets if abs(math.log(b[1] / b[0]) - log_ar) <= tolerance]
    if not candidates:
        return None
    return min(candidates, key=lambda b: abs(math.log(b[0] * b[1]) - log_area))


def pair_bucket(
    size_a: tuple[int, int],
    size_b: tuple[int, int],
    buckets: Sequence[tuple[int, int]],
    tolerance: float = AR_TOLERANCE,
    pair_tolerance: float = PAIR_AR_TOLERANCE,
) -> tuple[tuple[int, int] | None, str]:
    """Shared bucket of a pair of image sizes ``(height, width)`` -> ``(bucket, "")`` or ``(None, reason)``.

    Reasons: ``no_bucket`` (an image fits no bucket), ``bucket_mismatch`` (different buckets and no
    shared one).
    """
    ba = assign_bucket(*size_a, buckets, tolerance)
    bb = assign_bucket(*size_b, buckets, tolerance)
    if ba is None or bb is None:
        return None, "no_bucket"
    if ba == bb:
        return ba, ""
    ar_a, ar_b = size_a[1] / size_a[0], size_b[1] / size_b[0]
    if abs(ar_a / ar_b - 1.0) >= pair_tolerance:
        return None, "bucket_mismatch"
    large, small = (size_a, size_b) if size_a[0] * size_a[1] >= size_b[0] * size_b[1] else (size_b, size_a)
    factor = max(large) / max(small)
    scaled = (small[0] * factor, small[1] * factor)
    shared = (int(round(min(large[0], scaled[0]))), int(round(min(large[1], scaled[1]))))
    bucket = assign_bucket(*shared, buckets, tolerance)
    return (bucket, "") if bucket is not None else (None, "bucket_mismatch")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class PairInput:
    """One input pair: images are paths or encoded bytes."""

    id: str
    prompt: str
    chosen: str | bytes
    rejected: str | bytes
    votes_chosen: int | None = None
    votes_rejected: int | None = None
    drop_reason: str = ""


def _resolve(path: str, root: Path) -> str:
    return path if os.path.isabs(path) else str(root / path)


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not valid JSON: {exc}") from exc
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: every entry must be a JSON object")
    return rows


def _require(row: dict[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where} lacks field(s) {missing}; it has {sorted(row)}")


def read_pairs(source: str | os.PathLike, layout: str = "jsonl", image_root: str | None = None) -> list[PairInput]:
    """Read the input pairs of ``source`` in ``layout`` (see the module docstring)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if layout == "pickapic":
        return _read_pickapic(path)
    root = Path(image_root) if image_root else path.parent
    pairs = []
    for i, row in enumerate(_read_json_rows(path)):
        where = f"{path} entry {i}"
        if layout == "jsonl":
            _require(row, ("prompt", "chosen_path", "rejected_path"), where)
            pairs.append(
                PairInput(
                    str(row.get("id", i)),
                    str(row["prompt"]),
                    _resolve(row["chosen_path"], root),
                    _resolve(row["rejected_path"], root),
                    row.get("votes_chosen"),
                    row.get("votes_rejected"),
                )
            )
        else:  # hpdv3
            _require(row, ("prompt", "path1", "path2"), where)
            chosen, rejected = _resolve(row["path1"], root), _resolve(row["path2"], root)
            votes = row.get("choice_dist")
            vc = vr = None
            if isinstance(votes, (list, tuple)) and len(votes) == 2:
                vc, vr = int(votes[0]), int(votes[1])
                if vr > vc:
                    chosen, rejected, vc, vr = rejected, chosen, vr, vc
            pairs.append(PairInput(str(row.get("id", i)), str(row["prompt"]), chosen, rejected, vc, vr))
    return pairs


def _read_pickapic(path: Path) -> list[PairInput]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .parquet files in {path}")
    pairs = []
    for f in files:
        table = pq.read_table(f)
        names = set(table.column_names)
        missing = [k for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1") if k not in names]
        if missing:
            raise ValueError(f"{f} lacks Pick-a-Pic column(s) {missing}; it has {sorted(names)}")
        for i, row in enumerate(table.to_pylist()):
            pid = f"{f.name}:{i}"
            l0, l1 = float(row["label_0"]), float(row["label_1"])
            if l0 == l1:
                pairs.append(PairInput(pid, row["caption"] or "", row["jpg_0"], row["jpg_1"], drop_reason="tie"))
            elif l0 > l1:
                pairs.append(PairInput(pid, row["caption"] or "", row["jpg_0"], row["jpg_1"]))
            else:
                pairs.append(PairInput(pid, row["caption"] or "", row["jpg_1"], row["jpg_0"]))
    return pairs


def _open_image(ref: str | bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref)


def image_size(ref: str | bytes) -> tuple[int, int]:
    """``(height, width)`` from the header only. FileNotFoundError / ValueError when unreadable."""
    if isinstance(ref, str) and not os.path.isfile(ref):
        raise FileNotFoundError(ref)
    try:
        with _open_image(ref) as img:
            w, h = img.size
    except OSError as exc:
        raise ValueError(f"unreadable image: {exc}") from exc
    return h, w


def load_pixels(ref: str | bytes, bucket: tuple[int, int]) -> torch.Tensor:
    """RGB image -> Lanczos resize to ``bucket`` (H, W) -> float (3, H, W) in [-1, 1]."""
    from PIL import Image

    with _open_image(ref) as img:
        rgb = img.convert("RGB").resize((bucket[1], bucket[0]), Image.Resampling.LANCZOS)
        array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------


@dataclass
class PlannedPair:
    pair: PairInput
    bucket: tuple[int, int]


@dataclass
class Plan:
    """Kept pairs (in shard order) and the dropped ones with reasons."""

    kept: list[PlannedPair] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)

    def reasons(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.dropped))

    def buckets(self) -> dict[str, int]:
        return dict(Counter(f"{p.bucket[0]}x{p.bucket[1]}" for p in self.kept))


def plan_pairs(
    pairs: Sequence[PairInput],
    buckets: Sequence[tuple[int, int]],
    min_size: int = 256,
    progress: bool = False,
) -> Plan:
    """Decide for every pair: keep (with its bucket) or drop (``tie``, ``empty_prompt``,
    ``missing_file``, ``unreadable``, ``too_small``, ``no_bucket``, ``bucket_mismatch``)."""
    from tqdm.auto import tqdm

    plan = Plan()
    for pair in tqdm(pairs, desc="planning", disable=not progress, leave=False):
        if pair.drop_reason:
            plan.dropped.append((pair.id, pair.drop_reason))
            continue
        if not pair.prompt.strip():
            plan.dropped.append((pair.id, "empty_prompt"))
            continue
        try:
            sizes = [image_size(pair.chosen), image_size(pair.rejected)]
        except FileNotFoundError:
            plan.dropped.append((pair.id, "missing_file"))
            continue
        except ValueError:
            plan.dropped.append((pair.id, "unreadable"))
            continue
        if any(min(s) < min_size for s in sizes):
            plan.dropped.append((pair.id, "too_small"))
            continue
        bucket, reason = pair_bucket(sizes[0], sizes[1], buckets)
        if bucket is None:
            plan.dropped.append((pair.id, reason))
        else:
            plan.kept.append(PlannedPair(pair, bucket))
    return plan


def shard_name(i: int) -> str:
    return f"part_{i:05d}.parquet"


def chunk(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


def load_vae(spec: str, dtype: torch.dtype = torch.float32) -> Any:
    """The SD3 VAE of ``spec``: ``tiny`` / ``tiny:SEED`` (offline tiny pipeline), a pipeline folder or
    hub id (``vae`` subfolder), or a VAE folder."""
    if spec == "tiny" or spec.startswith("tiny:"):
        from dinalrm_align.testing import tiny_sd3_pipeline

        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        vae = tiny_sd3_pipeline(seed).vae
        return vae if dtype == torch.float32 else vae.to(dtype)
    from diffusers import AutoencoderKL

    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "vae").is_dir():
        return AutoencoderKL.from_pretrained(spec, torch_dtype=dtype).eval()
    return AutoencoderKL.from_pretrained(spec, subfolder="vae", torch_dtype=dtype).eval()


@torch.no_grad()
def encode_pixels(vae: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> SD3-normalised latents (B, C, h, w) float32 (posterior sample)."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(param.device, dist.mean.dtype)
    z = dist.mean + dist.std * eps
    shift = vae.config.shift_factor or 0.0
    return ((z - shift) * vae.config.scaling_factor).float().cpu()


def encode_shard(
    vae: Any, items: Sequence[PlannedPair], batch_size: int, seed: int, source: str
) -> list[PairRecord]:
    """Encode one shard's pairs (images batched per bucket); deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    latents: dict[int, list[np.ndarray]] = {}
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(items):
        by_bucket.setdefault(item.bucket, []).append(i)
    for bucket, members in sorted(by_bucket.items()):
        refs = [(i, side) for i in members for side in ("chosen", "rejected")]
        for part in chunk(refs, batch_size):
            pixels = torch.stack([load_pixels(getattr(items[i].pair, side), bucket) for i, side in part])
            for (i, _), z in zip(part, encode_pixels(vae, pixels, g)):
                latents.setdefault(i, []).append(z.numpy())
    records = []
    for i, item in enumerate(items):
        p = item.pair
        records.append(
            PairRecord(
                prompt=p.prompt,
                chosen=latents[i][0],
                rejected=latents[i][1],
                votes_chosen=p.votes_chosen,
                votes_rejected=p.votes_rejected,
                height=item.bucket[0],
                width=item.bucket[1],
                chosen_path=p.chosen if isinstance(p.chosen, str) else None,
                rejected_path=p.rejected if isinstance(p.rejected, str) else None,
                source=source,
            )
        )
    return records


@dataclass
class PreprocessOptions:
    """Options of :func:`preprocess` (the CLI flags)."""

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


def preprocess(options: PreprocessOptions, accelerator: Any = None) -> dict[str, Any]:
    """Run the whole preprocessing; returns (and writes, main process) the summary."""
    from tqdm.auto import tqdm

    if options.shard_size < 1 or options.batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    out = Path(options.output)
    out.mkdir(parents=True, exist_ok=True)
    pairs = read_pairs(options.source, options.layout, options.image_root)
    plan = plan_pairs(pairs, options.buckets, options.min_size, progress=options.progress and main)
    shards = list(chunk(plan.kept, options.shard_size))
    mine = [i for i in range(len(shards)) if i % accelerator.num_processes == accelerator.process_index]
    todo = [i for i in mine if not (out / shard_name(i)).is_file()]
    skipped = len(mine) - len(todo)
    if todo:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[options.dtype]
        vae = load_vae(options.vae, dtype).to(accelerator.device)
        bar = tqdm(
            total=sum(len(shards[i]) for i in todo), desc=f"encoding (rank {accelerator.process_index})",
            unit="pair", disable=not options.progress,
        )
        for i in todo:
            records = encode_shard(vae, shards[i], options.batch_size, options.seed * 1_000_003 + i, options.layout)
            write_shard(out / shard_name(i), records)
            bar.update(len(records))
        bar.close()
    accelerator.wait_for_everyone()
    summary = {
        "source": str(options.source),
        "layout": options.layout,
        "output": str(out),
        "total_pairs": len(pairs),
        "kept_pairs": len(plan.kept),
        "dropped_pairs": len(plan.dropped),
        "dropped_by_reason": plan.reasons(),
        "pairs_per_bucket": plan.buckets(),
        "num_shards": len(shards),
        "shards_skipped_existing": int(
            accelerator.reduce(torch.tensor(skipped, device=accelerator.device), reduction="sum").item()
        )
        if accelerator.num_processes > 1
        else skipped,
        "min_size": options.min_size,
        "buckets": [f"{h}x{w}" for h, w in options.buckets],
    }
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        with (out / "dropped.jsonl").open("w") as fh:
            for pid, reason in plan.dropped:
                fh.write(json.dumps({"id": pid, "reason": reason}) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for the end of a run."""
    lines = [
        f"pairs: {summary['total_pairs']} read, {summary['kept_pairs']} kept, {summary['dropped_pairs']} dropped",
    ]
    for reason, count in sorted(summary["dropped_by_reason"].items()):
        lines.append(f"  dropped ({reason}): {count}")
    for bucket, count in sorted(summary["pairs_per_bucket"].items()):
        lines.append(f"  bucket {bucket}: {count}")
    lines.append(
        f"shards: {summary['num_shards']} in {summary['output']} ({summary['shards_skipped_existing']} already there)"
    )
    return "\n".join(lines)
