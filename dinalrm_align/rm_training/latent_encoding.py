"""Planned preference pairs -> SD3-normalised VAE latents (one shard at a time).

Images are read by :class:`.image_workers.ImageReaders` (time limit per image); a pair whose image
fails to read is skipped and described in a skip record, the other pairs of the shard go on.
Images are encoded per bucket in batches of ``batch_size`` images in plan order (chosen, rejected,
next pair, ...), with a posterior sample seeded per shard, so a shard is reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinalrm_align.rm_training.data import PairRecord
from dinalrm_align.rm_training.image_io import DEFAULT_MAX_PIXELS, ImageFault, decode_rgb, describe
from dinalrm_align.rm_training.image_workers import ImageReaders
from dinalrm_align.rm_training.pair_sources import PairInput

logger = logging.getLogger("dinalrm_align.rm_training.preprocess")
SIDES = ("chosen", "rejected")


@dataclass
class PlannedPair:
    pair: PairInput
    bucket: tuple[int, int]


def skip_record(pair: PairInput, faults: Sequence[tuple[str, ImageFault]], stage: str) -> dict[str, Any]:
    """One ``skipped.jsonl`` line: the pair, its first bad image (``side``, ``image``, ``reason``,
    ``detail``), the ``stage`` (``header`` or ``decode``) and all faults when both images are bad."""
    side, fault = faults[0]
    record: dict[str, Any] = {
        "id": pair.id,
        "image": describe(getattr(pair, side)),
        "side": side,
        "reason": fault.reason,
        "detail": fault.detail,
        "stage": stage,
    }
    if len(faults) > 1:
        record["faults"] = [{"side": s, "reason": f.reason, "detail": f.detail} for s, f in faults]
    logger.warning(
        "skipping pair %s: %s image %s: %s (%s)", pair.id, side, record["image"], fault.reason, fault.detail
    )
    return record


def pixels_to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def load_pixels(ref: str | bytes, bucket: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """RGB image -> Lanczos resize to ``bucket`` (H, W) -> float (3, H, W) in [-1, 1] (in this process).

    ValueError naming the image and the reason when it is missing, truncated, unreadable or too large.
    """
    try:
        return pixels_to_tensor(decode_rgb(ref, bucket, max_pixels))
    except ImageFault as fault:
        raise ValueError(f"image {describe(ref)}: {fault}") from fault


def load_vae(spec: str, dtype: torch.dtype = torch.float32) -> Any:
    """The VAE of ``spec`` (its config holds the family's latent shift / scale): a tiny id (``tiny``,
    ``tiny-flux``, ``tiny-zimage``, ``:SEED``; offline tiny pipelines), a pipeline folder or hub id (``vae``
    subfolder), or a VAE folder. FLUX.1 and Z-Image share the FLUX autoencoder, so their latents are
    interchangeable; SD3.5 latents are not."""
    from dinalrm_align.tiny_pipelines import parse_tiny_id, tiny_pipeline

    tiny = parse_tiny_id(spec)
    if tiny is not None:
        vae = tiny_pipeline(tiny[0], seed=tiny[1]).vae
        return vae if dtype == torch.float32 else vae.to(dtype)
    from diffusers import AutoencoderKL

    from dinalrm_align.backbones.registry import dtype_kwargs

    path = Path(spec)
    try:
        if path.is_dir() and (path / "config.json").is_file() and not (path / "vae").is_dir():
            return AutoencoderKL.from_pretrained(spec, **dtype_kwargs(dtype)).eval()
        return AutoencoderKL.from_pretrained(spec, subfolder="vae", **dtype_kwargs(dtype)).eval()
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"could not load the VAE {spec!r}: {str(exc).splitlines()[0]} (with HF_HUB_OFFLINE=1 "
                                "only cached models load)") from exc


@torch.no_grad()
def encode_pixels(vae: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> normalised latents ``(z - shift) * scale`` (B, C, h, w) float32 (posterior sample)."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(param.device, dist.mean.dtype)
    z = dist.mean + dist.std * eps
    shift = vae.config.shift_factor or 0.0
    return ((z - shift) * vae.config.scaling_factor).float().cpu()


def encode_shard(
    vae: Any,
    items: Sequence[PlannedPair],
    batch_size: int,
    seed: int,
    source: str,
    readers: ImageReaders | None = None,
) -> tuple[list[PairRecord], list[dict[str, Any]]]:
    """Encode one shard's pairs -> ``(records, skip records)``; deterministic given ``seed``.

    Images are read ``batch_size`` pairs at a time (in parallel by ``readers``; default: in this
    process); pairs with a bad image are skipped, the images of the others are queued and encoded
    in batches of ``batch_size`` images per bucket (the same batches as without skips).
    """
    readers = readers if readers is not None else ImageReaders(workers=0, timeout=None)
    g = torch.Generator().manual_seed(seed)
    latents: dict[int, list[np.ndarray]] = {}
    skipped: list[dict[str, Any]] = []
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(items):
        by_bucket.setdefault(item.bucket, []).append(i)

    def flush(queue: list[tuple[int, torch.Tensor]], size: int) -> None:
        while queue and len(queue) >= size:
            part, queue[:] = queue[:batch_size], queue[batch_size:]
            for (i, _), z in zip(part, encode_pixels(vae, torch.stack([p for _, p in part]), g)):
                latents.setdefault(i, []).append(z.numpy())

    for bucket, members in sorted(by_bucket.items()):
        queue: list[tuple[int, torch.Tensor]] = []
        for start in range(0, len(members), batch_size):
            group = members[start : start + batch_size]
            arrays = readers.pixels([(getattr(items[i].pair, side), bucket) for i in group for side in SIDES])
            for k, i in enumerate(group):
                pair_arrays = arrays[2 * k : 2 * k + 2]
                faults = [(s, a) for s, a in zip(SIDES, pair_arrays) if isinstance(a, ImageFault)]
                if faults:
                    skipped.append({**skip_record(items[i].pair, faults, "decode"), "bucket": f"{bucket[0]}x{bucket[1]}"})
                    continue
                queue += [(i, pixels_to_tensor(a)) for a in pair_arrays]
            flush(queue, batch_size)
        flush(queue, 1)
    records = []
    for i, item in enumerate(items):
        if i not in latents:
            continue
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
    return records, skipped
