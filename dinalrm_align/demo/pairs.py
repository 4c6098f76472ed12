"""Colour-world preference pairs: policy samples, tinted variants, a simulated Thurstone annotator.

For every prompt and seed the tiny policy samples a latent ``z`` (the same ODE sampler the ReFL
stage uses). Its candidates are ``z`` itself and ``z + tint + distractor`` for random tints
(``optics.tint``: spatially constant latent offsets along the decoder's three colour directions)
and distractors (off-colour offsets and 2x2 patterns that barely change the decoded colour; they
teach the reward model what does NOT matter, which keeps ReFL from exploiting those directions).
Every candidate is decoded and given its golden reward ``g``. Random candidate pairs of one prompt
(across seeds) whose golden gap is at least ``min_gap`` become preference pairs; the simulated
annotator perceives ``g + N(0, noise^2)`` per image (Thurstone), so close pairs are sometimes
labelled the "wrong" way round.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dinalrm_align.demo.world import ColourOptics, decode
from dinalrm_align.rm_training.data import PairRecord


@torch.no_grad()
def sample_policy(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    latent_shape: tuple[int, int, int],
    num_steps: int,
    max_sequence_length: int,
    batch_size: int = 32,
    transformer: Any = None,
    cache: Any = None,
) -> torch.Tensor:
    """Clean latents (N, C, h, w) of ``prompts[i]`` from start noise seeded by ``seeds[i]`` (Euler ODE, no CFG),
    on any supported backbone (through its adapter). ``transformer``: another policy transformer than the
    pipeline's (e.g. one with a LoRA); ``cache``: a :class:`~dinalrm_align.reward_model.text.PromptEmbeddingCache`."""
    from dinalrm_align.backbones.registry import adapter_for
    from dinalrm_align.reward_model.text import encode_conditioning
    from dinalrm_align.sampling.rollout import Denoiser, ode_rollout

    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
    adapter = adapter_for(pipe)
    transformer = transformer if transformer is not None else pipe.transformer
    sigmas, _ = adapter.inference_schedule(pipe.scheduler.config, num_steps, latent_shape[1:])
    guidance = adapter.default_embedded_guidance if adapter.guidance_embedded(transformer) else None  # FLUX.1-dev
    denoiser = Denoiser(adapter, transformer, guidance=guidance)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        cond = encode_conditioning(pipe, chunk, max_sequence_length, dtype=torch.float32, cache=cache)
        noise = torch.stack(
            [torch.randn(latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds[start : start + batch_size]]
        )
        out.append(ode_rollout(denoiser, noise, sigmas, cond).float())
    return torch.cat(out)


@dataclass
class PairSet:
    """Pairs plus, per pair, whether the annotator's label agrees with the golden order."""

    records: list[PairRecord] = field(default_factory=list)
    agrees_with_golden: list[bool] = field(default_factory=list)
    golden_gaps: list[float] = field(default_factory=list)
    candidates: int = 0
    skipped_close: int = 0

    def stats(self) -> dict[str, float]:
        n = len(self.records)
        return {
            "pairs": n,
            "candidates": self.candidates,
            "skipped_near_ties": self.skipped_close,
            "label_agreement_with_golden": float(np.mean(self.agrees_with_golden)) if n else float("nan"),
            "mean_golden_gap": float(np.mean(self.golden_gaps)) if n else float("nan"),
        }


def label_probability(gap: float, noise: float) -> float:
    """Thurstone: P(first preferred) = Phi(gap / (sqrt(2) noise)) for golden gap ``g_first - g_second``."""
    if noise <= 0:
        return 1.0 if gap > 0 else (0.5 if gap == 0 else 0.0)
    return 0.5 * (1.0 + math.erf(gap / (2.0 * noise)))


def build_pairs(
    pipe: Any,
    optics: ColourOptics,
    latents: torch.Tensor,
    prompts: Sequence[str],
    *,
    tints_per_latent: int,
    pairs_per_prompt: int,
    min_gap: float,
    label_noise: float,
    generator: torch.Generator,
    height: int,
    width: int,
    distractor_offset: float = 1.0,
    distractor_pattern: float = 0.5,
    tint_std: float = 1.0,
) -> PairSet:
    """Candidates, golden rewards and labelled pairs.

    Every latent yields ``tints_per_latent + 1`` candidates: itself and tinted copies (tints ``N(0, tint_std^2)``
    per colour direction); every tinted
    copy also gets a distractor (:meth:`ColourOptics.distractors`). Pairs are drawn at random among
    all candidates of the same prompt (so across seeds too): ``pairs_per_prompt`` per prompt,
    skipping near-ties (golden gap below ``min_gap``).
    """
    n, k = latents.shape[0], tints_per_latent + 1
    tints = tint_std * torch.randn(n, k, 3, generator=generator)
    tints[:, 0] = 0.0  # the policy's own sample is always a candidate
    noise = optics.distractors(n * k, tuple(latents.shape[1:]), distractor_offset, distractor_pattern, generator)
    noise = noise.reshape(n, k, *latents.shape[1:])
    noise[:, 0] = 0.0
    candidates = (latents[:, None] + optics.tint(tints) + noise).flatten(0, 1)  # (N * K, C, h, w)
    owner = [p for p in prompts for _ in range(k)]
    golden = optics.golden(decode(pipe, candidates), owner)
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(owner):
        by_prompt.setdefault(p, []).append(i)
    out = PairSet(candidates=len(owner))
    for prompt, members in by_prompt.items():
        all_pairs = list(itertools.combinations(members, 2))
        order = torch.randperm(len(all_pairs), generator=generator).tolist()
        kept = 0
        for j in order:
            if kept >= pairs_per_prompt:
                break
            a, b = all_pairs[j]
            gap = float(golden[a] - golden[b])
            if abs(gap) < min_gap:
                out.skipped_close += 1
                continue
            first_wins = float(torch.rand(1, generator=generator)) < label_probability(gap, label_noise)
            win, lose = (a, b) if first_wins else (b, a)
            out.records.append(
                PairRecord(
                    prompt=prompt,
                    chosen=candidates[win].numpy(),
                    rejected=candidates[lose].numpy(),
                    height=height,
                    width=width,
                    source="colour_world",
                )
            )
            out.agrees_with_golden.append(bool(golden[win] > golden[lose]))
            out.golden_gaps.append(abs(gap))
            kept += 1
    return out
