"""Per-sample seeding of the reward's re-noising (reproducible; never tied to a rank's RNG).

DiNa-LRM scores ``x_sigma = (1 - sigma) x0 + sigma * eps``; with a fresh ``eps`` the same latent
gets a different score on every call (upstream draws it from the global RNG, so scores also
depend on the rank and on everything else that consumed random numbers). Here every sample's
``eps`` comes from its *own* CPU ``torch.Generator`` seeded by a 63-bit integer derived from the
sample, so the noise of a sample never depends on the rank's RNG state, on the device or on how
the batch is micro-batched on a server.

How a sample's seed is chosen (:meth:`NoiseSeeding.seeds`), in order:

1. ``metadata[i]["seed"]`` if the trainer passes one (an ``int``): used as is.
2. mode ``"prompt"`` (default): ``hash(base_seed, step, key_i)`` where ``key_i`` is the prompt (or a
   hash of the pooled embedding when no prompt text is given). All images of a prompt share one
   noise draw: common random numbers, so the reward *differences* inside a GRPO group (all that
   group-normalised advantages use) carry less noise, and the seed is the same whichever rank
   or batch a sample lands in.
3. mode ``"sample"``: ``hash(base_seed, step, key_i, index_i)`` with ``index_i`` =
   ``metadata[i]["sample_id"]`` if given, else the occurrence of that prompt within the call
   (0 for the first image of a prompt, 1 for the second ...): every image gets its own noise.
   Pass ``sample_id`` (e.g. a global sample index) to make it independent of how a group is
   split over ranks; without it it is reproducible for a given batch layout.
4. mode ``"random"``: seeds drawn from the global torch RNG (like upstream; reproducible only
   under ``torch.manual_seed``).

``step`` (set with ``set_step`` on the rewards) lets the noise change between epochs while the
run stays reproducible across restarts. Noise of a given seed is ``torch.randn`` on a CPU
generator, so it is the same on every device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

SeedMode = Literal["sample", "prompt", "random"]
MAX_SEED = 2**63 - 1


def hash_seed(*parts: Any) -> int:
    """A 63-bit seed from the ``str`` of each part (blake2b; stable across processes and machines)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & MAX_SEED


def request_seeds(seed: int, batch_size: int) -> list[int]:
    """Per-sample seeds of a request that gives one ``seed`` for its whole batch (server API)."""
    return [hash_seed("request", seed, i) for i in range(batch_size)]


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed must be an integer in [0, 2**63 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**63 - 1], got {value!r}")
    return value


def embedding_keys(pooled_prompt_embeds: torch.Tensor) -> list[str]:
    """Stable per-row keys of pooled embeddings (used when no prompt text is available)."""
    rows = pooled_prompt_embeds.detach().to("cpu", torch.float32).contiguous()
    return ["emb:" + hashlib.blake2b(row.numpy().tobytes(), digest_size=8).hexdigest() for row in rows]


@dataclass(frozen=True)
class NoiseSeeding:
    """How per-sample seeds are derived (see the module docstring).

    Args:
        mode: ``"prompt"`` (default; shared within a prompt), ``"sample"`` or ``"random"``.
        base_seed: mixes into every derived seed (change it to get another noise realisation).
    """

    mode: SeedMode = "prompt"
    base_seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("sample", "prompt", "random"):
            raise ValueError(f"seeding mode must be 'sample', 'prompt' or 'random', got {self.mode!r}")
        check_seed(self.base_seed, "base_seed")

    def seeds(
        self,
        keys: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
        step: int = 0,
    ) -> list[int]:
        """One seed per sample for the sample keys (prompts) of one call."""
        if metadata is not None and len(metadata) != len(keys):
            raise ValueError(f"got {len(keys)} samples but {len(metadata)} metadata entries")
        out: list[int] = []
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            meta = metadata[i] if metadata is not None and isinstance(metadata[i], Mapping) else {}
            occurrence = seen.get(key, 0)
            seen[key] = occurrence + 1
            if meta.get("seed") is not None:
                out.append(check_seed(meta["seed"], f"metadata[{i}]['seed']"))
            elif self.mode == "random":
                out.append(int(torch.randint(0, 2**62, (1,)).item()))
            elif self.mode == "prompt":
                out.append(hash_seed(self.base_seed, step, key))
            else:
                index = meta.get("sample_id", occurrence)
                out.append(hash_seed(self.base_seed, step, key, index))
        return out


def noise_from_seeds(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    n_noise: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Standard normal noise, one CPU generator per sample.

    Args:
        seeds: B seeds.
        shape: the per-sample latent shape (C, h, w).
        n_noise: draws per sample.

    Returns:
        (B, C, h, w) for ``n_noise == 1``, else (n_noise, B, C, h, w) -- what ``LatentRewardModel.score``
        takes as ``noise``. Sample i's draws depend only on ``seeds[i]``.
    """
    per_sample = []
    for seed in seeds:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        per_sample.append(torch.randn((n_noise, *shape), generator=generator, dtype=torch.float32))
    noise = torch.stack(per_sample, dim=1).to(device=device, dtype=dtype)
    return noise[0] if n_noise == 1 else noise


def batch_seeds(
    seeding: NoiseSeeding,
    *,
    batch_size: int,
    prompts: Sequence[str] | None,
    pooled_prompt_embeds: torch.Tensor | None,
    metadata: Sequence[Mapping[str, Any]] | None,
    step: int = 0,
) -> list[int]:
    """Seeds of one call: keys are the prompts if given, else hashes of the pooled embeddings.

    Local and remote rewards both use this, so the same inputs give the same noise on both.
    """
    from dinalrm_align.rewards.protocol import check_metadata, check_prompts

    if prompts is not None:
        keys = check_prompts(prompts, batch_size)
    elif pooled_prompt_embeds is not None:
        keys = embedding_keys(pooled_prompt_embeds)
    else:
        raise ValueError("seeding needs prompts or pooled_prompt_embeds (the per-sample keys)")
    return seeding.seeds(keys, check_metadata(metadata, batch_size), step=step)
