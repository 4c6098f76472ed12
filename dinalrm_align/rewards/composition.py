"""Weighted composition of named latent rewards: ``{name: scores, ..., "avg": weighted sum}``.

Two ways to build one:

* :class:`CompositeReward` from ready reward objects: ``CompositeReward({"dinalrm": (r, 1.0)})``;
* :func:`build_composite` from configs (:class:`RewardSpec`, or dicts with ``name``, ``type``,
  ``weight``, ``kwargs``): identical configs (same ``type`` and ``kwargs``) are built **once**
  and share one instance, which is also evaluated once per call.

Every component's (B,) scores are returned, so a trainer can log each part (``reward_<name>``)
and train on ``"avg"``. Scores are float32 on the latents' device.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import torch

from dinalrm_align.rewards import protocol as P

AVG = "avg"

#: Built-in reward types for :func:`build_composite` (``"module:attribute"``, imported lazily).
REWARD_TYPES: dict[str, str] = {
    "dinalrm": "dinalrm_align.rewards.dinalrm:DiNaLatentReward.from_pretrained",
    "remote": "dinalrm_align.rewards.remote:RemoteLatentReward",
    "pickscore": "dinalrm_align.rewards.pickscore:PickScoreLatentReward",
}


class CompositeReward:
    """Weighted sum of named latent rewards; the call returns every component and ``"avg"``.

    Args:
        components: ``{name: (reward, weight)}`` (or a sequence of ``(name, reward, weight)``).
            The same reward object may appear under several names: it is evaluated once per call.
    """

    name = "composite"

    def __init__(
        self,
        components: Mapping[str, tuple[Any, float]] | Sequence[tuple[str, Any, float]],
    ) -> None:
        items = (
            [(n, r, w) for n, (r, w) in components.items()]
            if isinstance(components, Mapping)
            else [tuple(c) for c in components]
        )
        if not items:
            raise ValueError("a composite reward needs at least one component")
        names: list[str] = []
        for name, reward, weight in items:
            if not isinstance(name, str) or not name:
                raise ValueError(f"component names must be non-empty strings, got {name!r}")
            if name == AVG:
                raise ValueError(f"{AVG!r} is reserved for the weighted sum; rename that component")
            if name in names:
                raise ValueError(f"duplicate component name {name!r}")
            if not isinstance(reward, P.LatentReward):
                raise ValueError(
                    f"component {name!r} is a {type(reward).__name__}, not a latent reward "
                    "(needs name, required_fields, optional_fields and a keyword-only __call__)"
                )
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of {name!r} must be a finite number, got {weight!r}")
            names.append(name)
        self.components: list[tuple[str, Any, float]] = [(n, r, float(w)) for n, r, w in items]
        required = {f for _, r, _ in self.components for f in r.required_fields}
        optional = {f for _, r, _ in self.components for f in r.optional_fields} - required
        order = (*P.FIELDS, P.TEXT, P.TEXT_UNPOOLED)
        self.required_fields: tuple[str, ...] = tuple(f for f in order if f in required)
        self.optional_fields: tuple[str, ...] = tuple(f for f in order if f in optional)

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.components]

    @property
    def weights(self) -> dict[str, float]:
        return {n: w for n, _, w in self.components}

    @property
    def unique_rewards(self) -> list[Any]:
        """Distinct reward objects (shared instances counted once)."""
        seen: dict[int, Any] = {}
        for _, r, _ in self.components:
            seen.setdefault(id(r), r)
        return list(seen.values())

    @property
    def differentiable(self) -> bool:
        """True if every component offers ``score_differentiable``."""
        return all(isinstance(r, P.DifferentiableLatentReward) for _, r, _ in self.components)

    def set_step(self, step: int) -> None:
        """Forward ``set_step`` (noise seeding per epoch) to every component that has it."""
        for reward in self.unique_rewards:
            if hasattr(reward, "set_step"):
                reward.set_step(step)

    def _run(self, method: str, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        b = P.batch_size_of(inputs[P.LATENTS])
        available = P.provided_fields(**inputs)
        for _, reward, _ in self.components:
            P.check_required_fields(reward, available)
        device = inputs[P.LATENTS].device
        computed: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for name, reward, weight in self.components:
            if id(reward) not in computed:
                fn = getattr(reward, method)
                computed[id(reward)] = P.check_scores(fn(**inputs), b, name).to(device)
            scores = computed[id(reward)]
            out[name] = scores
            total = weight * scores if total is None else total + weight * scores
        out[AVG] = total  # type: ignore[assignment]
        return out

    def __call__(
        self,
        *,
        latents: torch.Tensor,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{name: (B,) scores, ..., "avg": sum(weight * scores)}``, no gradients."""
        inputs = dict(
            latents=latents,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            prompts=prompts,
            metadata=metadata,
        )
        with torch.no_grad():
            return self._run("__call__", inputs)

    def score_differentiable_details(
        self,
        *,
        latents: torch.Tensor,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Like the call, with gradients w.r.t. ``latents``; every component must be differentiable."""
        if not self.differentiable:
            plain = [n for n, r, _ in self.components if not isinstance(r, P.DifferentiableLatentReward)]
            raise TypeError(f"components {plain} are not differentiable (a remote reward never is)")
        inputs = dict(
            latents=latents,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            prompts=prompts,
            metadata=metadata,
        )
        return self._run("score_differentiable", inputs)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={w:g}*{type(r).__name__}" for n, r, w in self.components)
        return f"CompositeReward({parts})"


@dataclass(frozen=True)
class RewardSpec:
    """One configured reward: ``type`` is a key of :data:`REWARD_TYPES` or ``"pkg.module:factory"``.

    ``kwargs`` go to the factory; ``weight`` only to the composition (it is not part of the
    config key, so the same reward with two weights is still built once).
    """

    name: str
    type: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_any(cls, spec: RewardSpec | Mapping[str, Any]) -> RewardSpec:
        if isinstance(spec, RewardSpec):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"a reward spec must be a RewardSpec or a mapping, got {type(spec).__name__}")
        unknown = set(spec) - {"name", "type", "weight", "kwargs"}
        if unknown:
            raise ValueError(f"unknown reward spec keys {sorted(unknown)}; valid: name, type, weight, kwargs")
        missing = {"name", "type"} - set(spec)
        if missing:
            raise ValueError(f"reward spec {dict(spec)} lacks {sorted(missing)}")
        return cls(spec["name"], spec["type"], spec.get("weight", 1.0), dict(spec.get("kwargs") or {}))

    def config_key(self) -> str:
        """Identity of the built reward: type + kwargs (objects by identity, values by value)."""
        return json.dumps({"type": self.type, "kwargs": dict(self.kwargs)}, sort_keys=True, default=_key_of)


def _key_of(value: Any) -> Any:
    """JSON stand-in for non-JSON values: plain values by value, live objects by identity."""
    if isinstance(value, (set, frozenset)):
        return sorted(repr(v) for v in value)
    if isinstance(value, (torch.dtype, torch.device, PurePath)):
        return f"{type(value).__name__}:{value}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__dataclass__": type(value).__qualname__, **dataclasses.asdict(value)}
    return f"<{type(value).__qualname__}@{id(value):x}>"


def resolve_factory(type_: str) -> Callable[..., Any]:
    """The callable named by a reward type (built-in key or ``"pkg.module:attr.attr"``)."""
    target = REWARD_TYPES.get(type_, type_)
    if ":" not in target:
        raise ValueError(
            f"unknown reward type {type_!r}; use one of {sorted(REWARD_TYPES)} or 'package.module:factory'"
        )
    module_name, attr_path = target.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for reward type {type_!r}: {exc}") from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"{module_name!r} has no attribute {attr_path!r} (reward type {type_!r})")
        obj = getattr(obj, attr)
    return obj


def _accepted(factory: Callable[..., Any], context: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(context)
    return {k: v for k, v in context.items() if k in params}


def build_composite(
    specs: Iterable[RewardSpec | Mapping[str, Any]],
    *,
    context: Mapping[str, Any] | None = None,
) -> CompositeReward:
    """Build every distinct reward config once and compose them.

    Args:
        specs: reward configs; names must be unique.
        context: shared objects (e.g. ``pipeline``, ``device``, ``torch_dtype``) given to each
            factory that names them as parameters; a spec's own ``kwargs`` win over the context.
    """
    context = dict(context or {})
    built: dict[str, Any] = {}
    components: list[tuple[str, Any, float]] = []
    for raw in specs:
        spec = RewardSpec.from_any(raw)
        key = spec.config_key()
        if key not in built:
            factory = resolve_factory(spec.type)
            kwargs = {**_accepted(factory, {**context, "name": spec.name}), **spec.kwargs}
            built[key] = factory(**kwargs)
        components.append((spec.name, built[key], spec.weight))
    return CompositeReward(components)


def as_composite(
    reward: Any, pipeline: Any | None = None, *, name: str = "dinalrm", **kwargs: Any
) -> CompositeReward:
    """Turn what a user has into a :class:`CompositeReward`.

    Accepts a composite (returned as is), a latent reward (one component, weight 1), a
    ``LatentRewardModel`` (wrapped in :class:`~dinalrm_align.rewards.dinalrm.DiNaLatentReward`) or a
    hub id / folder of a reward model (loaded on ``pipeline``). ``kwargs`` configure the
    ``DiNaLatentReward`` (``u``, ``normalization``, ``seeding``, ``torch_dtype``, ``device`` ...).
    """
    if isinstance(reward, CompositeReward):
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} cannot reconfigure an existing CompositeReward")
        return reward
    if isinstance(reward, P.LatentReward):
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} cannot reconfigure an existing reward object")
        return CompositeReward({reward.name: (reward, 1.0)})
    from dinalrm_align.rewards.dinalrm import DiNaLatentReward

    if isinstance(reward, torch.nn.Module) and hasattr(reward, "score"):
        loading = sorted({"torch_dtype", "device", "share_base_weights"} & set(kwargs))
        if loading:
            raise ValueError(f"{loading} only apply when loading a reward model by id or path")
        return CompositeReward({name: (DiNaLatentReward(reward, pipeline, name=name, **kwargs), 1.0)})
    if isinstance(reward, str) or hasattr(reward, "__fspath__"):
        if pipeline is None:
            raise ValueError("loading a reward model by id or path needs its family's pipeline (pipeline=...)")
        return CompositeReward(
            {name: (DiNaLatentReward.from_pretrained(reward, pipeline, name=name, **kwargs), 1.0)}
        )
    raise ValueError(
        f"cannot make a reward from {type(reward).__name__}; pass a reward model id/path, a LatentRewardModel, "
        "a latent reward or a CompositeReward"
    )
