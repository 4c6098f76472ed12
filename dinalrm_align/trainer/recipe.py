"""Loading recipes: typed dataclasses filled by OmegaConf from YAML plus ``key.sub=value`` overrides.

:func:`load_recipe` reads the YAML, applies the overrides (OmegaConf dotlist syntax, values parsed as
YAML), picks the algorithm named in ``algorithm.name`` (its class declares the recipe schema and the
``algorithm`` section's type), merges everything into ``OmegaConf.structured`` schemas and returns the
dataclass instance. Every mistake is a ``ValueError`` (or ``FileNotFoundError``) with one line that
names the key: unknown keys list the valid ones (with a did-you-mean), wrong types say what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "config_to_dict",
    "flatten_dict",
    "load_recipe",
    "parse_overrides",
    "read_yaml",
    "recipe_fingerprint",
    "save_config",
]


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans and floats: only ``true`` / ``false`` are booleans (``mixed_precision: no`` stays
    the string "no") and ``1e-4`` is a float."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(  # also ``1e-4`` (YAML 1.1 wants ``1.0e-4``)
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping; FileNotFoundError / ValueError with the path in the message."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe not found: {p}")
    try:
        data = yaml.load(p.read_text(), Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"recipe {p} is not valid YAML{where}: {first}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {p} must contain a mapping at the top level, got {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "a.b=[1,2]"]`` -> nested dict (values parsed as YAML 1.2, like the recipe file)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.load(text, Loader=_Yaml12Loader) if text.strip() else ""  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from exc
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return out


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:57] + '...' if len(text) > 60 else text}"


def _section_type(tp: Any) -> type | None:
    """The dataclass inside an annotation (``X`` or ``X | None``; not ``list[X]``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _check_tuple_length(tp: Any, value: Any, where: str) -> None:
    """Fixed-length tuples (e.g. ``optim.betas``): OmegaConf's own error does not name the key."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    for arg in args:
        items = typing.get_args(arg)
        if typing.get_origin(arg) is tuple and items and Ellipsis not in items and isinstance(value, (list, tuple)):
            if len(value) != len(items):
                raise ValueError(f"key '{where}' expects {len(items)} items, got {len(value)}: {list(value)}")


def _check_tree(raw: Mapping[str, Any], schema: type, path: str) -> None:
    """Unknown keys (with the valid ones) and sections given as scalars, before OmegaConf sees them."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    section = path or "the recipe's top level"
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            valid = list(fields)
            hint = difflib.get_close_matches(str(key), valid, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(f"unknown key '{where}' in {section}{suggestion}; valid keys: {', '.join(valid)}")
        _check_tuple_length(hints[key], value, where)
        sub = _section_type(hints[key])
        if sub is None:
            continue
        if value is None and type(None) in typing.get_args(hints[key]):
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"section '{where}' must be a mapping of its keys, got {_describe(value)}")
        _check_tree(value, sub, where)
    for key, value in raw.items():  # lists of sections (e.g. eval.proxy_rewards)
        tp = hints.get(key)
        if typing.get_origin(tp) is list and isinstance(value, list):
            item = _section_type(typing.get_args(tp)[0]) if typing.get_args(tp) else None
            if item is not None:
                for i, entry in enumerate(value):
                    where = f"{path}.{key}[{i}]" if path else f"{key}[{i}]"
                    if not isinstance(entry, Mapping):
                        raise ValueError(f"'{where}' must be a mapping, got {_describe(entry)}")
                    _check_tree(entry, item, where)


def _omegaconf_error(exc: Exception) -> ValueError:
    """One readable line from an OmegaConf validation error."""
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    name = type(exc).__name__
    if name == "MissingMandatoryValue":
        missing = first.rsplit(":", 1)[-1].strip() if key is None else key
        return ValueError(f"missing required key '{missing}'")
    if key:
        return ValueError(f"key '{key}': {first}")
    return ValueError(f"invalid recipe: {first}")


def load_recipe(
    recipe: str | os.PathLike | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    default_algorithm: str = "refl",
) -> Any:
    """Load a recipe (YAML path or mapping) plus overrides into the schema of its algorithm.

    Relative paths that the recipe class lists in ``RELATIVE_PATHS`` and that do not exist from the
    working directory are looked up next to the recipe file.

    Raises:
        FileNotFoundError: the recipe file does not exist.
        ValueError: malformed YAML, an unknown key, a wrong type, a missing required key, an unknown
            algorithm, or a value a section's own checks refuse.
    """
    from omegaconf import OmegaConf

    from dinalrm_align.algorithms.registry import resolve_algorithm

    base_dir: Path | None = None
    if isinstance(recipe, Mapping):
        raw = dict(recipe)
    else:
        raw = read_yaml(recipe)
        base_dir = Path(recipe).resolve().parent
    raw = _deep_merge(raw, parse_overrides(overrides))
    algo = raw.get("algorithm") or {}
    if isinstance(algo, str):
        algo = {"name": algo}
    if not isinstance(algo, Mapping):
        raise ValueError(f"section 'algorithm' must be a mapping (or an algorithm name), got {_describe(algo)}")
    algo = dict(algo)
    algo.setdefault("name", default_algorithm)
    raw["algorithm"] = algo
    algo_cls = resolve_algorithm(str(algo["name"]))
    schema_cls = algo_cls.recipe_class
    _check_tree({k: v for k, v in raw.items() if k != "algorithm"}, schema_cls, "")
    _check_tree(algo, algo_cls.config_class, "algorithm")
    if base_dir is not None:
        for dotted in getattr(schema_cls, "RELATIVE_PATHS", ()):
            section, key = dotted.split(".", 1)
            value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), Mapping) else None
            if isinstance(value, str) and value and ":" not in value.split("/")[0]:
                if not Path(value).is_absolute() and not Path(value).exists() and (base_dir / value).exists():
                    raw[section] = {**raw[section], key: str(base_dir / value)}
    try:
        schema = OmegaConf.structured(schema_cls)
        schema.algorithm = OmegaConf.structured(algo_cls.config_class)
        merged = OmegaConf.merge(schema, raw)
        return OmegaConf.to_object(merged)
    except Exception as exc:
        if type(exc).__module__.startswith("omegaconf"):  # (its ValidationError is also a ValueError)
            raise _omegaconf_error(exc) from exc
        raise  # e.g. a section's own __post_init__ check: already one readable line


def config_to_dict(config: Any) -> Any:
    """Dataclass (nested) -> plain dict / list / scalars, safe for YAML, JSON and trackers."""
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


def recipe_fingerprint(config: Any) -> str:
    """sha256 of the resolved recipe without the keys that may change on resume (``RESUMABLE_CHANGES``)."""
    skip = tuple(getattr(config, "RESUMABLE_CHANGES", ()))
    flat = flatten_dict(config_to_dict(config))
    kept = {k: v for k, v in sorted(flat.items()) if not any(k == s or k.startswith(s + ".") for s in skip)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
