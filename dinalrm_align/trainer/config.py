"""Typed dataclass configs loaded from YAML recipes plus ``--set key.sub=value`` overrides.

Generic helpers (reusable for any config dataclass):

- :func:`load_dataclass` builds a (nested) dataclass from a mapping, type-checks every value and
  rejects unknown keys with the list of valid ones.
- :func:`apply_overrides` applies ``a.b=c`` strings (values parsed as YAML scalars) to a mapping.
- :func:`read_yaml`, :func:`config_to_dict`, :func:`save_config`, :func:`flatten_dict`.

Training config: :class:`TrainConfig` (sections ``model``, ``reward``, ``sampling``, ``data``,
``optim``, ``train``, ``ema``, ``checkpoint``, ``eval``, ``tracking`` and ``algorithm``), loaded with
:func:`load_train_config`. The ``algorithm`` section is typed by the algorithm's own config class,
looked up by its ``name`` (see :mod:`dinalrm_align.algorithms.base`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

#: Joint-attention projections of every SD3 block (``attn.`` prefix keeps ``attn2`` un-adapted).
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


# ----------------------------------------------------------------------------------------------
# Generic loading helpers
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widen to float)."""
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ValueError(f"key '{where}' expects null, got {_describe(value)}")
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        names = " | ".join(_type_name(a) for a in args)
        raise ValueError(f"key '{where}' expects {names}, got {_describe(value)}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return value
        raise ValueError(f"key '{where}' must be one of {list(choices)}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"section '{where}' must be a mapping, got {_describe(value)}")
        return load_dataclass(tp, value, section=where)
    if origin in (list, tuple, Iterable) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"key '{where}' expects a list ({_type_name(tp)}), got {_describe(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ValueError(f"key '{where}' expects {len(args)} items ({_type_name(tp)}), got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"key '{where}' expects a mapping, got {_describe(value)}")
        args = typing.get_args(tp)
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _coerce(k, key_tp, f"{where}.<key>"): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"key '{where}' expects bool (true/false), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"key '{where}' expects int, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"key '{where}' expects float, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"key '{where}' expects str, got {_describe(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ValueError(f"key '{where}' expects {_type_name(tp)}, got {_describe(value)}")
    return value


def _unknown_key_error(key: str, valid: list[str], section: str) -> ValueError:
    hint = difflib.get_close_matches(key, valid, n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    return ValueError(
        f"unknown key '{key}' in section '{section}'{suggestion}; valid keys: {', '.join(valid)}"
    )


def load_dataclass(cls: type[T], mapping: Mapping[str, Any] | None, section: str = "root") -> T:
    """Build dataclass ``cls`` from ``mapping``; nested dataclass fields take nested mappings.

    Every value is checked against its annotation (``int``, ``float``, ``bool``, ``str``,
    ``Literal``, ``X | None``, ``list[X]``, ``tuple[...]``, ``dict[K, V]``, nested dataclasses).
    Missing keys keep their defaults; a field without default must be present.

    Raises:
        ValueError: unknown key (message lists the valid keys), wrong type, missing required key,
            or whatever the dataclass' ``__post_init__`` raises.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, Mapping):
        raise ValueError(f"section '{section}' must be a mapping, got {_describe(mapping)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    valid = list(fields)
    kwargs: dict[str, Any] = {}
    for key, value in mapping.items():
        if key not in fields:
            raise _unknown_key_error(str(key), valid, section)
        where = key if section == "root" else f"{section}.{key}"
        kwargs[key] = _coerce(value, hints[key], where)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where = name if section == "root" else f"{section}.{name}"
            raise ValueError(f"missing required key '{where}'")
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> ``(["train", "lr"], 1e-4)`` (the value is parsed as a YAML scalar)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(mapping: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a deep copy of ``mapping`` with ``key.sub=value`` overrides applied (creating sections)."""
    import copy

    result: dict[str, Any] = copy.deepcopy(dict(mapping))
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {item!r}: '{'.'.join(path[: i + 1])}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; FileNotFoundError / ValueError with the path in the message."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {p} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {p} must contain a mapping at the top level, got {type(data).__name__}")
    return data


def config_to_dict(config: Any) -> Any:
    """Dataclass (nested) -> plain dict/list/scalars, safe for YAML and trackers."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    return config


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (keys in declaration order)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def flatten_dict(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": "[1, 2]"}`` (scalars only; for trackers)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = str(list(value))
        elif value is None:
            flat[name] = "null"
        else:
            flat[name] = value
    return flat


# ----------------------------------------------------------------------------------------------
# Training config sections
# ----------------------------------------------------------------------------------------------


def _positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"'{name}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class LoraSettings:
    """Policy LoRA (peft ``LoraConfig``) on the SD3 transformer."""

    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    init: Literal["gaussian", "default"] = "gaussian"
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        _positive("model.lora.r", self.r)
        _positive("model.lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"'model.lora.dropout' must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("'model.lora.target_modules' must name at least one module")


@dataclass
class ModelConfig:
    """The policy: an SD3 pipeline (hub id, local folder, or ``tiny`` / ``tiny:SEED``)."""

    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"
    revision: str | None = None
    variant: str | None = None
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False


@dataclass
class RewardConfig:
    """The latent reward model (hub id, local folder, or ``tiny`` / ``tiny:SEED``) and its use."""

    model: str = "liuhuohuo/DiNa-LRM-SD35M-12layers"
    share_base_weights: bool = False
    dtype: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    u: float = 0.4
    n_noise: int = 1
    offset: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.u <= 1.0:
            raise ValueError(f"'reward.u' must be in [0, 1], got {self.u}")
        _positive("reward.n_noise", self.n_noise)
        if self.scale is not None and self.scale == 0:
            raise ValueError("'reward.scale' must be non-zero")


@dataclass
class SamplingConfig:
    """Flow-matching Euler sampler used for training rollouts."""

    resolution: int = 512
    num_steps: int = 40
    guidance_scale: float = 4.5
    negative_prompt: str = ""
    max_sequence_length: int = 128

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % 16 != 0:
            raise ValueError(f"'sampling.resolution' must be a positive multiple of 16, got {self.resolution}")
        _positive("sampling.num_steps", self.num_steps)
        _positive("sampling.max_sequence_length", self.max_sequence_length)


@dataclass
class DataConfig:
    """Prompt source: a .txt (one per line), a .jsonl (``column`` field) or ``hub:NAME`` dataset."""

    prompts: str = ""
    format: Literal["auto", "txt", "jsonl", "hub"] = "auto"
    column: str = "prompt"
    split: str = "train"
    eval_prompts: str | None = None
    eval_split: str | None = None
    num_eval_prompts: int = 16
    shuffle: bool = True

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("missing required key 'data.prompts' (a .txt, .jsonl or hub:NAME prompt source)")
        _positive("data.num_eval_prompts", self.num_eval_prompts, allow_zero=True)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (diffusers' ``get_scheduler`` names)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.max_grad_norm", self.max_grad_norm)
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)


@dataclass
class TrainSection:
    """Batching and precision. One *step* is one optimizer update.

    ``batch_size`` is prompts per process per micro-step. ``global_batch_size`` (optional) is
    samples per update; when set it must be divisible by ``batch_size x num_processes`` and fixes
    ``gradient_accumulation_steps``. ``num_threads`` sets ``torch.set_num_threads`` (CPU runs; tiny
    models are fastest with 1 thread, more threads only add contention).
    """

    max_steps: int = 150
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    allow_tf32: bool = True
    num_threads: int | None = None
    log_every: int = 1

    def __post_init__(self) -> None:
        _positive("train.max_steps", self.max_steps)
        _positive("train.num_threads", self.num_threads)
        _positive("train.batch_size", self.batch_size)
        _positive("train.gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive("train.global_batch_size", self.global_batch_size)
        _positive("train.log_every", self.log_every)

    def accumulation_for(self, num_processes: int) -> int:
        """Gradient-accumulation steps for ``num_processes``; ValueError if the batch does not divide."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_micro = self.batch_size * num_processes
        if self.global_batch_size % per_micro != 0:
            raise ValueError(
                f"train.global_batch_size {self.global_batch_size} is not divisible across processes: "
                f"batch_size {self.batch_size} x {num_processes} processes = {per_micro} samples per micro-step"
            )
        return self.global_batch_size // per_micro


@dataclass
class EMAConfig:
    """EMA of the trainable weights, used for evaluation and for the saved weights."""

    enabled: bool = True
    decay: float = 0.9
    update_every: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"'ema.decay' must be in [0, 1), got {self.decay}")
        _positive("ema.update_every", self.update_every)


@dataclass
class CheckpointConfig:
    """Checkpoints every ``every`` steps (0: never), keeping the last ``keep_last``."""

    every: int = 50
    keep_last: int = 3
    resume: str | None = None

    def __post_init__(self) -> None:
        _positive("checkpoint.every", self.every, allow_zero=True)
        _positive("checkpoint.keep_last", self.keep_last)


@dataclass
class ProxyRewardConfig:
    """An evaluation-only reward: ``target`` is ``pkg.module:callable`` or ``pkg.module.callable``.

    The callable is called as ``fn(inputs, prompts, **kwargs)`` where ``inputs`` are decoded images
    ``(B, 3, H, W)`` in [0, 1] (``inputs: images``) or latents ``(B, 16, h, w)`` (``inputs: latents``),
    and returns ``B`` scores. If ``target`` names a factory (``factory: true``) it is called once
    with ``kwargs`` and must return such a callable.
    """

    name: str = ""
    target: str = ""
    inputs: Literal["images", "latents"] = "images"
    factory: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("eval.proxy_rewards entries need a 'target' (pkg.module:callable)")
        if not self.name:
            self.name = self.target.replace(":", ".").rsplit(".", 1)[-1]


@dataclass
class EvalConfig:
    """Deterministic ODE evaluation on held-out prompts with fixed seeds."""

    every: int = 25
    at_start: bool = True
    at_end: bool = True
    num_steps: int = 40
    guidance_scale: float = 4.5
    batch_size: int = 4
    seed: int = 1234
    images: bool = True
    grid_columns: int = 4
    proxy_rewards: list[ProxyRewardConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        _positive("eval.every", self.every, allow_zero=True)
        _positive("eval.num_steps", self.num_steps)
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.grid_columns", self.grid_columns)


@dataclass
class TrackingConfig:
    """Trackers through accelerate: ``wandb``, ``tensorboard`` or ``none``."""

    log_with: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "dinalrm-align"
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None
    entity: str | None = None


@dataclass
class AlgorithmConfig:
    """Base of every algorithm's config section; ``name`` selects the algorithm."""

    name: str = ""


@dataclass
class TrainConfig:
    """A whole training recipe."""

    run_dir: str = "runs/default"
    seed: int = 0
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(kw_only=True)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.reward.share_base_weights and self.model.finetune != "lora":
            raise ValueError(
                "reward.share_base_weights: true needs a LoRA policy (model.finetune: lora); with full "
                "fine-tuning the shared blocks would change under the reward model"
            )


def load_train_config(
    recipe: str | os.PathLike | Mapping[str, Any],
    overrides: Iterable[str] = (),
) -> TrainConfig:
    """Load a :class:`TrainConfig` from a YAML file (or a mapping) plus ``key.sub=value`` overrides.

    The ``algorithm`` section is typed by the config class of the algorithm named in
    ``algorithm.name`` (default ``refl``). Relative ``data.prompts`` / ``data.eval_prompts`` paths
    that do not exist from the working directory are looked up next to the recipe file.
    """
    from dinalrm_align.algorithms.base import resolve_algorithm

    base_dir: Path | None = None
    if isinstance(recipe, Mapping):
        raw = dict(recipe)
    else:
        raw = read_yaml(recipe)
        base_dir = Path(recipe).resolve().parent
    raw = apply_overrides(raw, overrides)
    algo_raw = raw.pop("algorithm", None) or {}
    if isinstance(algo_raw, str):
        algo_raw = {"name": algo_raw}
    if not isinstance(algo_raw, Mapping):
        raise ValueError(f"section 'algorithm' must be a mapping, got {_describe(algo_raw)}")
    algo_raw = dict(algo_raw)
    algo_raw.setdefault("name", "refl")
    algo_cls = resolve_algorithm(str(algo_raw["name"]))
    algorithm = load_dataclass(algo_cls.config_class, algo_raw, section="algorithm")
    raw["algorithm"] = algorithm
    if base_dir is not None and isinstance(raw.get("data"), dict):
        data = dict(raw["data"])
        for key in ("prompts", "eval_prompts"):
            value = data.get(key)
            if isinstance(value, str) and value and not value.startswith("hub:"):
                if not Path(value).is_absolute() and not Path(value).exists() and (base_dir / value).exists():
                    data[key] = str(base_dir / value)
        raw["data"] = data
    return load_dataclass(TrainConfig, raw, section="root")
