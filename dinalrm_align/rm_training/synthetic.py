"""Synthetic colour-preference pairs, so that tiny reward-model recipes run standalone on any backbone.

A pair is two images of the same smooth random texture, tinted with two different colours; the prompt
names one of them ("a red ball") and the image tinted with that colour is preferred. Both images are
encoded with the recipe pipeline's own VAE and normalisation (posterior mean), so the pairs fit the
backbone that trains on them. The task is easy and exactly learnable: a reward model that reads the
colour of the latent and the colour word of the prompt scores every pair right.

Folders are written to a temporary sibling and renamed into place, so concurrent processes (or an
interrupted run) never see a half-written pair set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

__all__ = ["COLOURS", "OBJECTS", "ensure_synthetic_pairs", "synthetic_images"]

#: Colour words and their RGB in [0, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.85, 0.1),
}
OBJECTS = ("cube", "ball", "car", "tree")


def synthetic_images(colours: list[str], generator: torch.Generator, side: int) -> torch.Tensor:
    """One smooth random texture per colour name, tinted with it: ``(B, 3, side, side)`` in [-1, 1]."""
    b = len(colours)
    coarse = torch.rand(b, 1, 4, 4, generator=generator)
    texture = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    rgb = torch.tensor([COLOURS[c] for c in colours], dtype=torch.float32).view(b, 3, 1, 1)
    image = 0.65 * rgb + 0.35 * texture
    return image * 2 - 1


def _pairs(pipe: object, adapter: object, n: int, seed: int, side: int) -> list:
    from dinalrm_align.rm_training.data import PairRecord

    g = torch.Generator().manual_seed(seed)
    names = list(COLOURS)
    records: list[PairRecord] = []
    batch = 32
    for start in range(0, n, batch):
        m = min(batch, n - start)
        good = torch.randint(len(names), (m,), generator=g)
        bad = (good + torch.randint(1, len(names), (m,), generator=g)) % len(names)
        objects = torch.randint(len(OBJECTS), (m,), generator=g)
        texture_seed = int(torch.randint(2**31 - 1, (1,), generator=g))
        chosen_pixels = synthetic_images([names[i] for i in good], torch.Generator().manual_seed(texture_seed), side)
        rejected_pixels = synthetic_images([names[i] for i in bad], torch.Generator().manual_seed(texture_seed), side)
        with torch.no_grad():
            chosen = adapter.encode_pixels(pipe.vae, chosen_pixels, sample=False)  # type: ignore[attr-defined]
            rejected = adapter.encode_pixels(pipe.vae, rejected_pixels, sample=False)  # type: ignore[attr-defined]
        for i in range(m):
            records.append(PairRecord(
                prompt=f"a {names[int(good[i])]} {OBJECTS[int(objects[i])]}", chosen=chosen[i].numpy(),
                rejected=rejected[i].numpy(), votes_chosen=1, votes_rejected=0, height=side, width=side,
                source="synthetic-colour",
            ))
    return records


def ensure_synthetic_pairs(
    folders: dict[str, int], pipeline: str, *, backbone: str = "auto", seed: int = 0, side: int = 32
) -> list[Path]:
    """Write ``{folder: number of pairs}`` of synthetic pairs where a folder does not exist yet.

    ``pipeline``: a pipeline spec (tiny id, folder or hub id) whose VAE encodes the images. Returns the
    folders that were written. ValueError for ``side`` not fitting the backbone.
    """
    missing = {Path(f): n for f, n in folders.items() if not Path(f).exists()}
    if not missing:
        return []
    from dinalrm_align.backbones.loading import load_any_pipeline
    from dinalrm_align.rm_training.data import write_shard

    pipe, adapter = load_any_pipeline(pipeline, backbone=backbone, torch_dtype=torch.float32, what="model.pipeline")
    multiple = adapter.vae_scale_factor(pipe) * adapter.latent_multiple(pipe.transformer)
    if side % multiple:
        raise ValueError(f"synthetic pair images of {side} px do not fit {pipeline}: the side must be a multiple "
                         f"of {multiple}")
    written = []
    for i, (folder, n) in enumerate(sorted(missing.items())):
        records = _pairs(pipe, adapter, n, seed + 7919 * i, side)
        tmp = folder.parent / f".tmp_{folder.name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_shard(tmp / "part_00000.parquet", records)
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, folder)
            written.append(folder)
        except OSError:  # another process was first: use its pairs
            shutil.rmtree(tmp, ignore_errors=True)
    return written
