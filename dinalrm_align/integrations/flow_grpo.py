"""Flow-GRPO, latent-native: score the sampler's final latents, no VAE decode and re-encode.

Flow-GRPO's reward functions take decoded images: per-reward functions are called as
``fn(images, prompts, metadata, only_strict=...) -> (scores, details)`` and its ``multi_score(device,
{name: weight})`` factory combines them into ``reward_fn(images, prompts, metadata, only_strict=True) ->
({name: scores, ..., "avg": weighted sum}, {})``, which the trainer calls from a thread pool, turns into
tensors with ``torch.as_tensor(value, device=...)``, trains on ``"avg"`` and logs as ``reward_<name>``.

The same conventions with *latents* in place of images:

* :class:`FlowGRPOLatentReward` (:func:`flow_grpo_latent_reward_fn`): the drop-in ``reward_fn``,
  ``fn(latents, prompts, metadata, only_strict=True) -> ({"dinalrm": f32[B], "avg": f32[B]}, {})``;
* :class:`FlowGRPOLatentScorer` (``reward_fn.as_scorer()``): one reward in the per-reward convention,
  ``fn(latents, prompts, metadata, only_strict=True) -> (f32[B], details)``;
* :class:`FlowGRPOLatentMultiScore` (:func:`flow_grpo_latent_multi_score`): ``multi_score``'s weighted
  combination for a ``{name: weight}`` dictionary whose entries are latent scorers or Flow-GRPO's own image
  rewards (computed by a ``multi_score`` function built for those names): ``fn(latents, prompts, metadata,
  only_strict=True, images=None)``.

``latents`` are the final latents of the sampler. Flow-GRPO's SD3 sampler returns the trajectory as a list,
which the script stacks to ``(B, T+1, C, h, w)``: the final latents are ``latents[:, -1]`` (``latents[-1]``
would be the whole trajectory of the last sample). Packed FLUX latents ``(B, N, 64)`` are unpacked with the
``height``/``width`` given at construction (the sampler's resolution); SD3.5 and Z-Image latents are used as
they are. Every value returned is a ``numpy.ndarray`` of shape ``(B,)`` and dtype float32; reward noise is
seeded per sample (never per rank); ``only_strict`` is accepted and ignored (a GenEval option).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dinalrm_align.integrations.common import LatentScoring, build_scoring, to_float32_numpy
from dinalrm_align.rewards.composition import AVG

__all__ = [
    "FlowGRPOLatentMultiScore",
    "FlowGRPOLatentReward",
    "FlowGRPOLatentScorer",
    "flow_grpo_latent_multi_score",
    "flow_grpo_latent_reward_fn",
]

ScoreDetails = dict[str, Any]


class FlowGRPOLatentReward:
    """Drop-in ``reward_fn``: ``fn(latents, prompts, metadata, only_strict=True) -> (details, {})``.

    ``latents``: the final latents ``(B, C, h, w)`` (``latents[:, -1]`` of the stacked trajectory) or packed
    FLUX tokens ``(B, N, 64)``; ``prompts``: B strings; ``metadata``: B dicts (``{"seed": int}`` fixes a
    sample's reward noise) or ``None``. ``details`` holds each reward component and ``"avg"``, every value a
    float32 ``(B,)`` numpy array.
    """

    def __init__(self, scoring: LatentScoring) -> None:
        self.scoring = scoring

    def __call__(
        self,
        latents: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Any] | None = None,
        only_strict: bool = True,
        *,
        images: Any = None,
        ref_images: Any = None,
    ) -> tuple[ScoreDetails, dict[str, Any]]:
        """``images`` / ``ref_images`` are accepted and ignored (same call as :class:`FlowGRPOLatentMultiScore`)."""
        return to_float32_numpy(self.scoring.details(latents, prompts, metadata)), {}

    def differentiable(
        self, latents: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Any] | None = None
    ) -> torch.Tensor:
        """``"avg"`` as a ``(B,)`` float32 tensor with gradients w.r.t. ``latents`` (ReFL-style forks)."""
        return self.scoring.details(latents, prompts, metadata, differentiable=True)[AVG]

    def as_scorer(self) -> FlowGRPOLatentScorer:
        """This reward in the per-reward convention (for :func:`flow_grpo_latent_multi_score`)."""
        return FlowGRPOLatentScorer(self.scoring)

    def set_step(self, step: int) -> None:
        """Vary the reward noise per epoch (reproducibly): call ``reward_fn.set_step(epoch)`` once per epoch."""
        self.scoring.set_step(step)


class FlowGRPOLatentScorer:
    """One reward in Flow-GRPO's per-reward convention, on latents:
    ``fn(latents, prompts, metadata, only_strict=True) -> (scores f32[B], details)``.

    ``scores`` is the reward's ``"avg"``; ``details`` holds the components of a composite reward (empty for a
    single reward), each a float32 ``(B,)`` numpy array.
    """

    def __init__(self, scoring: LatentScoring) -> None:
        self.scoring = scoring

    def __call__(
        self,
        latents: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Any] | None = None,
        only_strict: bool = True,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        details = to_float32_numpy(self.scoring.details(latents, prompts, metadata))
        scores = details.pop(AVG)
        return scores, (details if len(details) > 1 else {})

    def set_step(self, step: int) -> None:
        self.scoring.set_step(step)


def _as_scores(value: Any, batch_size: int, name: str) -> np.ndarray:
    """A reward's scores (tensor, array or list) as a float32 ``(B,)`` numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32).numpy()
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"reward {name!r} returned {type(value).__name__}, not numbers: {exc}") from exc
    if array.shape != (batch_size,):
        raise ValueError(f"reward {name!r} returned shape {array.shape}, expected ({batch_size},)")
    return array


class FlowGRPOLatentMultiScore:
    """``multi_score``'s combination with latent rewards next to image rewards.

    ``fn(latents, prompts, metadata, only_strict=True, images=None) -> ({name: f32[B], ..., "avg": f32[B]},
    info)``: each latent scorer gets ``(latents, prompts, metadata, only_strict=...)``; the image rewards come
    from ``image_reward_fn(images, prompts, metadata, only_strict=...)`` (Flow-GRPO's own ``multi_score``
    built for those names), whose per-name entries are used and whose other keys (e.g. GenEval accuracies) are
    passed through. ``"avg"`` is the ``score_dict``-weighted sum; ``info`` is the image function's info.

    Args:
        score_dict: ``{name: weight}`` as in Flow-GRPO's ``config.reward_fn``.
        latent_scorers: ``{name: scorer}`` for the names scored on latents (per-reward convention, e.g.
            ``reward_fn.as_scorer()``).
        image_reward_fn: ``multi_score``-shaped function for the remaining names (needs ``images=`` per call).
    """

    def __init__(
        self,
        score_dict: Mapping[str, float],
        latent_scorers: Mapping[str, Callable[..., Any]],
        image_reward_fn: Callable[..., Any] | None = None,
    ) -> None:
        if not isinstance(score_dict, Mapping) or not score_dict:
            raise ValueError("score_dict must be a non-empty {name: weight} mapping")
        for name, weight in score_dict.items():
            if not isinstance(name, str) or not name or name == AVG:
                raise ValueError(f"reward names must be non-empty strings other than {AVG!r}, got {name!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of {name!r} must be a finite number, got {weight!r}")
        unused = sorted(set(latent_scorers) - set(score_dict))
        if unused:
            raise ValueError(f"latent scorers {unused} have no weight in score_dict {dict(score_dict)}")
        for name, scorer in latent_scorers.items():
            if not callable(scorer):
                raise ValueError(f"latent scorer {name!r} is not callable ({type(scorer).__name__})")
        self.image_names = [n for n in score_dict if n not in latent_scorers]
        if self.image_names and image_reward_fn is None:
            raise ValueError(
                f"{self.image_names} are not latent scorers: pass image_reward_fn (Flow-GRPO's multi_score for "
                "those names) or add them to latent_scorers"
            )
        self.score_dict = {n: float(w) for n, w in score_dict.items()}
        self.latent_scorers = dict(latent_scorers)
        self.image_reward_fn = image_reward_fn

    def __call__(
        self,
        latents: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Any] | None = None,
        only_strict: bool = True,
        *,
        images: Any = None,
    ) -> tuple[ScoreDetails, dict[str, Any]]:
        batch = len(prompts) if not isinstance(prompts, str) else 1
        details: ScoreDetails = {}
        info: dict[str, Any] = {}
        if self.image_names:
            if images is None:
                raise ValueError(
                    f"rewards {self.image_names} score images: pass images=... (the decoded images of the batch)"
                )
            image_details, info = self.image_reward_fn(images, prompts, metadata, only_strict=only_strict)
            missing = [n for n in self.image_names if n not in image_details]
            if missing:
                raise ValueError(f"image_reward_fn returned no {missing}; it returned {sorted(image_details)}")
            for key, value in image_details.items():
                if key in self.image_names:
                    details[key] = _as_scores(value, batch, key)
                elif key != AVG and key not in self.score_dict:
                    details[key] = value  # extra keys (accuracies) pass through unchanged
        for name, scorer in self.latent_scorers.items():
            scores, _ = scorer(latents, prompts, metadata, only_strict=only_strict)
            details[name] = _as_scores(scores, batch, name)
        total = np.zeros(batch, dtype=np.float32)
        for name, weight in self.score_dict.items():
            total += np.float32(weight) * details[name]
        details[AVG] = total
        return details, dict(info or {})

    def set_step(self, step: int) -> None:
        """Forward ``set_step`` (noise seeding per epoch) to every latent scorer that has it."""
        for scorer in self.latent_scorers.values():
            if hasattr(scorer, "set_step"):
                scorer.set_step(step)


def flow_grpo_latent_reward_fn(
    reward: Any,
    pipeline: Any = None,
    *,
    name: str = "dinalrm",
    backbone: str | None = None,
    height: int | None = None,
    width: int | None = None,
    **options: Any,
) -> FlowGRPOLatentReward:
    """The drop-in latent ``reward_fn`` for Flow-GRPO (and DiffusionNFT).

    Args:
        reward: reward model id / folder / tiny id, ``LatentRewardModel``, latent reward or ``CompositeReward``.
        pipeline: the reward model's pipeline (SD3.5, FLUX.1 or Z-Image; may be the policy's own), or an id to
            load it from. Its text stack encodes the prompts (cached), its VAE factor unpacks FLUX latents.
        name: key of the reward in the returned details (single rewards).
        backbone: family of the latents when it is not the reward model's (rare).
        height, width: sampler resolution in pixels; needed only for packed FLUX latents.
        options: ``DiNaLatentReward`` settings: ``u`` (0.4), ``normalization`` (``"display"`` (raw+10)/10,
            ``"fork"`` (raw+12)/10, ``"raw"``), ``seeding``, ``n_noise``, ``max_sequence_length`` (128), and
            ``torch_dtype`` / ``device`` when loading by id.
    """
    scoring = build_scoring(reward, pipeline, name=name, backbone=backbone, height=height, width=width, **options)
    return FlowGRPOLatentReward(scoring)


def flow_grpo_latent_multi_score(
    score_dict: Mapping[str, float],
    latent_scorers: Mapping[str, Any],
    image_reward_fn: Callable[..., Any] | None = None,
) -> FlowGRPOLatentMultiScore:
    """Mix latent rewards with Flow-GRPO's own image rewards under one ``{name: weight}`` dictionary.

    ``latent_scorers`` values may be :class:`FlowGRPOLatentReward` objects (their :meth:`as_scorer` is used)
    or any callable in the per-reward latent convention. Example (SD3, DiNa-LRM + 0.2 x PickScore)::

        dina = flow_grpo_latent_reward_fn("liuhuohuo/DiNa-LRM-SD35M-12layers", pipeline, device=device)
        reward_fn = flow_grpo_latent_multi_score(
            {"dinalrm": 1.0, "pickscore": 0.2}, {"dinalrm": dina},
            image_reward_fn=flow_grpo.rewards.multi_score(device, {"pickscore": 1.0}))
        reward_fn(latents[:, -1], prompts, prompt_metadata, only_strict=True, images=images)
    """
    scorers = {n: (s.as_scorer() if hasattr(s, "as_scorer") else s) for n, s in latent_scorers.items()}
    return FlowGRPOLatentMultiScore(score_dict, scorers, image_reward_fn)
