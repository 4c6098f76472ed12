"""Typed view of a reward model's configuration.

A checkpoint's ``config.json`` is the full upstream training config (``model`` / ``training`` /
``data`` / ...). Only the ``model`` section (plus ``training.add_noise``) defines the network; the
other sections are kept verbatim so that a saved model round-trips. The project adds an optional
``dinalrm_align`` section holding the score normalisation and calibration.

``model.backbone`` names the model family (``sd3``, ``flux``, ``zimage``); checkpoints without it are
SD3.5 ones (the released model). :meth:`RewardModelConfig.for_backbone` gives each family's upstream
defaults (kept blocks, taps, LoRA rank, head width).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: Name of the reward LoRA adapter inside the backbone (never ``default``, which policies use).
ADAPTER_NAME = "rm_lora"

#: Keys the model section must contain (the reference implementation reads them unconditionally).
REQUIRED_MODEL_KEYS: tuple[str, ...] = (
    "num_transformer_layers",
    "visual_head_idx",
    "text_head_idx",
    "use_lora",
    "freeze_backbone",
    "reward_head",
)

#: Keys of the LoRA sub-section that must be present when ``use_lora`` is true.
REQUIRED_LORA_KEYS: tuple[str, ...] = ("r", "lora_alpha")


@dataclass
class LoraSettings:
    """LoRA on the backbone (PEFT ``LoraConfig`` values)."""

    r: int = 64
    lora_alpha: int = 128
    init_lora_weights: str | bool = "gaussian"


@dataclass
class HeadSettings:
    """Reward-head hyper-parameters. ``width=-1`` means the backbone's inner dim."""

    use_proj_in: bool = False
    width: int = -1
    out_dim: int = 1
    num_queries: int = 4
    num_attn_heads: int = 8
    dropout: float = 0.0


@dataclass
class Normalization:
    """``normalize(raw) = (raw + offset) / scale``; optional fitted calibration (see rm_training)."""

    offset: float = 10.0
    scale: float = 10.0
    #: Temperature of the preference probability ``sigmoid((r1 - r2) / temperature)`` if calibrated.
    temperature: float | None = None


@dataclass
class RewardModelConfig:
    """The network definition (``model`` section of the released ``config.json``).

    ``use_text_features`` only decides, as in the reference implementation, whether the last kept
    block's context-side projections get the reward LoRA when no text tap reads them; the tapped
    text features always feed the head. ``embedded_guidance``: guidance value fed to guidance-distilled
    backbones (FLUX.1-dev; None: the family's default, 3.5).
    """

    backbone: str = "sd3"
    num_transformer_layers: int = 12
    visual_head_idx: list[int] = field(default_factory=lambda: [4, 8, 12])
    text_head_idx: list[int] = field(default_factory=lambda: [4, 8, 12])
    use_lora: bool = True
    freeze_backbone: bool = False
    use_text_features: bool = True
    lora_config: LoraSettings = field(default_factory=LoraSettings)
    reward_head: HeadSettings = field(default_factory=HeadSettings)
    use_logistic: bool = False
    use_t_embed: bool = True
    backbone_model_id: str = "stabilityai/stable-diffusion-3.5-medium"
    model_type: str = "thurstone"
    embedded_guidance: float | None = None
    add_noise: bool = True
    normalization: Normalization = field(default_factory=Normalization)
    #: Fitted logistic parameters ``{"eta3", "eta4"}`` when ``use_logistic`` (project layout only).
    logistic: dict[str, float] | None = None
    #: Flow-matching scheduler config whose sigma table ``u`` is looked up in (project layout; None: the
    #: family's default, e.g. SD3.5's 1000 steps with shift 3).
    scheduler: dict[str, Any] | None = None
    #: Every other key of the full config (training/data/... sections and unknown model keys).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "config") -> RewardModelConfig:
        """Parse a full config (with a ``model`` section) or a bare model section.

        Raises:
            ValueError: a required key is missing or a value has the wrong type.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"{source}: expected a mapping, got {type(config).__name__}")
        full = copy.deepcopy(dict(config))
        model = full.get("model", full) if "model" in full else full
        if not isinstance(model, Mapping):
            raise ValueError(f"{source}: the 'model' section must be a mapping, got {type(model).__name__}")
        model = dict(model)
        missing = [k for k in REQUIRED_MODEL_KEYS if k not in model]
        if missing:
            raise ValueError(
                f"{source}: the model section lacks required key(s) {missing}; it has {sorted(model)}"
            )
        out = cls()
        if "backbone" in model and model["backbone"] is not None:
            out.backbone = str(model["backbone"])
        else:  # configs written before backbones were named: infer from the base model id (SD3 by default)
            base = str(model.get("backbone_model_id") or "").lower()
            out.backbone = "flux" if "flux" in base else "zimage" if ("z-image" in base or "zimage" in base) else "sd3"
        if model.get("embedded_guidance") is not None:
            value = model["embedded_guidance"]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{source}: embedded_guidance must be a number, got {value!r}")
            out.embedded_guidance = float(value)
        out.num_transformer_layers = _as_int(model, "num_transformer_layers", source)
        out.visual_head_idx = _as_int_list(model, "visual_head_idx", source)
        out.text_head_idx = _as_int_list(model, "text_head_idx", source)
        out.use_lora = _as_bool(model, "use_lora", source)
        out.freeze_backbone = _as_bool(model, "freeze_backbone", source)
        for key in ("use_text_features", "use_logistic", "use_t_embed"):
            if key in model:
                setattr(out, key, _as_bool(model, key, source))
        for key in ("backbone_model_id", "model_type"):
            if key in model and model[key] is not None:
                setattr(out, key, str(model[key]))
        if out.use_lora and not out.freeze_backbone:
            lora = model.get("lora_config")
            if not isinstance(lora, Mapping):
                raise ValueError(
                    f"{source}: use_lora is true but the model section lacks required key 'lora_config'"
                )
            lmissing = [k for k in REQUIRED_LORA_KEYS if k not in lora]
            if lmissing:
                raise ValueError(f"{source}: model.lora_config lacks required key(s) {lmissing}")
            out.lora_config = LoraSettings(
                r=_as_int(lora, "r", source + ":lora_config"),
                lora_alpha=_as_int(lora, "lora_alpha", source + ":lora_config"),
                init_lora_weights=lora.get("init_lora_weights", "gaussian"),
            )
        head = model["reward_head"]
        if not isinstance(head, Mapping):
            raise ValueError(f"{source}: model.reward_head must be a mapping")
        known_head = {f.name for f in fields(HeadSettings)}
        out.reward_head = HeadSettings(**{k: v for k, v in head.items() if k in known_head})
        training = full.get("training") if "model" in full else None
        if isinstance(training, Mapping) and "add_noise" in training:
            out.add_noise = bool(training["add_noise"])
        ours = full.get("dinalrm_align") if "model" in full else None
        if isinstance(ours, Mapping) and isinstance(ours.get("normalization"), Mapping):
            known_norm = {f.name for f in fields(Normalization)}
            out.normalization = Normalization(
                **{k: v for k, v in ours["normalization"].items() if k in known_norm}
            )
        if isinstance(ours, Mapping) and isinstance(ours.get("logistic"), Mapping):
            out.logistic = {k: float(v) for k, v in ours["logistic"].items()}
        if isinstance(ours, Mapping) and isinstance(ours.get("scheduler"), Mapping):
            out.scheduler = dict(ours["scheduler"])
        out.extra = (
            {k: v for k, v in full.items() if k not in ("model", "dinalrm_align")} if "model" in full else {}
        )
        known_model = {f.name for f in fields(cls)} - {"extra", "normalization", "add_noise", "logistic", "scheduler"}
        unknown_model = {k: v for k, v in model.items() if k not in known_model}
        if unknown_model:
            out.extra["_model_extra"] = unknown_model
        out.validate(source)
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> RewardModelConfig:
        """Read a JSON or YAML config file (the upstream parses both with a YAML loader)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reward-model config file not found: {path}")
        text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid JSON or YAML ({exc})") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def for_backbone(cls, backbone: str = "sd3", **overrides: Any) -> RewardModelConfig:
        """The upstream reward-model configuration of ``backbone`` (``overrides`` update the model section)."""
        from dinalrm_align.backbones.registry import get_adapter

        adapter = get_adapter(backbone)
        section = {
            "backbone": adapter.name, "freeze_backbone": False, "use_lora": True, "use_text_features": True,
            "use_logistic": False, "use_t_embed": True, "model_type": "thurstone",
            **copy.deepcopy(adapter.reward_defaults),
        }
        section.update(overrides)
        return cls.from_dict({"model": section, "training": {"add_noise": True}}, source=f"{adapter.name} defaults")

    def validate(self, source: str = "config") -> None:
        """Check internal consistency (known backbone, taps within the used blocks, head sizes)."""
        from dinalrm_align.backbones.registry import get_adapter

        try:
            self.backbone = get_adapter(self.backbone).name
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from exc
        n = self.num_transformer_layers
        if n < 1:
            raise ValueError(f"{source}: num_transformer_layers must be >= 1, got {n}")
        if not self.visual_head_idx:
            raise ValueError(f"{source}: visual_head_idx must name at least one tap")
        for key in ("visual_head_idx", "text_head_idx"):
            idx = getattr(self, key)
            bad = [i for i in idx if not 0 <= i <= n]
            if bad:
                raise ValueError(
                    f"{source}: {key} entries must lie in [0, num_transformer_layers={n}], got {bad}"
                )
            if 0 in idx[1:]:
                raise ValueError(
                    f"{source}: {key} may use index 0 (embedding output) only as its first entry"
                )
            if list(idx) != sorted(set(idx)):
                raise ValueError(f"{source}: {key} must be strictly increasing, got {idx}")
        if self.reward_head.out_dim < 1 or self.reward_head.num_queries < 1:
            raise ValueError(f"{source}: reward_head.out_dim and num_queries must be >= 1")

    # ------------------------------------------------------------------ export
    def model_section(self) -> dict[str, Any]:
        """The ``model`` section in the released key layout."""
        section = {
            "backbone": self.backbone,
            "model_type": self.model_type,
            "backbone_model_id": self.backbone_model_id,
            "num_transformer_layers": self.num_transformer_layers,
            "freeze_backbone": self.freeze_backbone,
            "use_lora": self.use_lora,
            "use_text_features": self.use_text_features,
            "lora_config": asdict(self.lora_config),
            "use_logistic": self.use_logistic,
            "visual_head_idx": list(self.visual_head_idx),
            "text_head_idx": list(self.text_head_idx),
            "use_t_embed": self.use_t_embed,
            "reward_head": asdict(self.reward_head),
        }
        if self.embedded_guidance is not None:
            section["embedded_guidance"] = self.embedded_guidance
        section.update(copy.deepcopy(self.extra.get("_model_extra", {})))
        return section

    def to_dict(self) -> dict[str, Any]:
        """The full config (what ``save_pretrained`` writes as ``config.json``)."""
        out = {k: copy.deepcopy(v) for k, v in self.extra.items() if k != "_model_extra"}
        out["model"] = self.model_section()
        training = dict(out.get("training") or {})
        training["add_noise"] = self.add_noise
        out["training"] = training
        out["dinalrm_align"] = {"normalization": asdict(self.normalization)}
        if self.logistic:
            out["dinalrm_align"]["logistic"] = dict(self.logistic)
        if self.scheduler:
            out["dinalrm_align"]["scheduler"] = dict(self.scheduler)
        return out


def _as_int(section: Mapping[str, Any], key: str, source: str) -> int:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
    return int(value)


def _as_bool(section: Mapping[str, Any], key: str, source: str) -> bool:
    value = section[key]
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _as_int_list(section: Mapping[str, Any], key: str, source: str) -> list[int]:
    value = section[key]
    if not isinstance(value, (list, tuple)) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise ValueError(f"{source}: {key} must be a list of integers, got {value!r}")
    return [int(v) for v in value]
