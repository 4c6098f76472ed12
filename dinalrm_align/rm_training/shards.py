"""Preference-pair latent shards (parquet): the layout, (de)serialisation and atomic writes.

Shard layout (one parquet file per shard, zstd, written atomically by :func:`write_shard`)::

    prompt           string
    chosen_latent    binary   float32 C-order bytes of the chosen normalised latent (C, h, w)
    rejected_latent  binary   same for the rejected latent
    chosen_shape     list<int32>  (C, h, w)
    rejected_shape   list<int32>
    votes_chosen     int32 (nullable)   human votes for the chosen image
    votes_rejected   int32 (nullable)
    height, width    int32    pixel size of the bucket the images were resized to
    chosen_path, rejected_path, source   string (nullable, provenance)

Latent bytes that start with the ``.npy`` magic (as other tools store them) are decoded too.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "dinalrm-align/pairs-v1"
_NPY_MAGIC = b"\x93NUMPY"

# ----------------------------------------------------------------------------------------------
# Latent (de)serialisation
# ----------------------------------------------------------------------------------------------


def latent_to_bytes(latent: np.ndarray | torch.Tensor) -> tuple[bytes, list[int]]:
    """Float32 C-order bytes and shape of a latent (C, h, w)."""
    if isinstance(latent, torch.Tensor):
        latent = latent.detach().cpu().float().numpy()
    array = np.ascontiguousarray(latent, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"a latent must be (C, h, w), got shape {array.shape}")
    return array.tobytes(), [int(s) for s in array.shape]


def latent_from_bytes(buffer: bytes, shape: Sequence[int] | None) -> np.ndarray:
    """Inverse of :func:`latent_to_bytes`; ``.npy`` bytes (magic header) carry their own shape."""
    if buffer[:6] == _NPY_MAGIC:
        return np.load(io.BytesIO(buffer), allow_pickle=False).astype(np.float32, copy=False)
    if shape is None:
        raise ValueError("raw latent bytes need a shape")
    expected = int(np.prod(shape)) * 4
    if len(buffer) != expected:
        raise ValueError(f"latent bytes have {len(buffer)} bytes, shape {list(shape)} needs {expected}")
    return np.frombuffer(buffer, dtype=np.float32).reshape(tuple(shape))


@dataclass
class PairRecord:
    """One preference pair with its latents (C, h, w) float32."""

    prompt: str
    chosen: np.ndarray
    rejected: np.ndarray
    votes_chosen: int | None = None
    votes_rejected: int | None = None
    height: int = 0
    width: int = 0
    chosen_path: str | None = None
    rejected_path: str | None = None
    source: str | None = None


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("prompt", pa.string()),
            ("chosen_latent", pa.binary()),
            ("rejected_latent", pa.binary()),
            ("chosen_shape", pa.list_(pa.int32())),
            ("rejected_shape", pa.list_(pa.int32())),
            ("votes_chosen", pa.int32()),
            ("votes_rejected", pa.int32()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("chosen_path", pa.string()),
            ("rejected_path", pa.string()),
            ("source", pa.string()),
        ],
        metadata={"format": FORMAT},
    )


def write_shard(path: str | os.PathLike, records: Sequence[PairRecord], row_group_size: int = 256) -> Path:
    """Write ``records`` to one parquet shard atomically (``.tmp`` file renamed when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not records:
        raise ValueError("a shard needs at least one record")
    cols: dict[str, list[Any]] = {name: [] for name in _schema().names}
    for r in records:
        cb, cs = latent_to_bytes(r.chosen)
        rb, rs = latent_to_bytes(r.rejected)
        if cs != rs:
            raise ValueError(f"pair {r.prompt!r}: chosen {cs} and rejected {rs} latents differ in shape")
        for key, value in (
            ("prompt", r.prompt),
            ("chosen_latent", cb),
            ("rejected_latent", rb),
            ("chosen_shape", cs),
            ("rejected_shape", rs),
            ("votes_chosen", r.votes_chosen),
            ("votes_rejected", r.votes_rejected),
            ("height", r.height),
            ("width", r.width),
            ("chosen_path", r.chosen_path),
            ("rejected_path", r.rejected_path),
            ("source", r.source),
        ):
            cols[key].append(value)
    table = pa.Table.from_pydict(cols, schema=_schema())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
    os.replace(tmp, path)
    return path


def list_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Parquet shards of a folder (sorted; temporary files skipped), a single file, or a list."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        root = Path(source)
        if root.is_file():
            paths = [root]
        elif root.is_dir():
            paths = sorted(p for p in root.glob("*.parquet") if not p.name.startswith("."))
        else:
            raise FileNotFoundError(f"pair shards not found: {root}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"pair shard(s) not found: {', '.join(missing)}")
    if not paths:
        raise FileNotFoundError(f"no .parquet shards in {source}")
    return paths
