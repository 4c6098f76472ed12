"""The recipe reference, generated from the config dataclasses themselves (their fields, defaults and the
``Attributes:`` sections of their docstrings), so the documentation cannot drift from the code.

``python -m dinalrm_align.trainer.reference > docs/recipes.md`` writes it; a test checks that the file
is up to date.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing

__all__ = ["field_docs", "recipe_reference"]

HEADER = """# Recipe reference

Every key of every recipe, with its default and meaning, generated from the config classes
(`python -m dinalrm_align.trainer.reference > docs/recipes.md`; a test keeps this file in sync).
Types are checked and unknown keys are errors that list the valid ones. Override any key on the
command line: `dinalrm-align train RECIPE.yaml train.max_steps=10 optim.lr=5e-5`.
"""


def field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` sections of the docstrings of ``cls`` and its bases
    (``a, b: text`` lines document several fields; indented lines continue the previous entry)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(_own_field_docs(klass))
    return out


def _own_field_docs(cls: type) -> dict[str, str]:
    doc = cls.__dict__.get("__doc__") or ""
    doc = inspect.cleandoc(doc)
    out: dict[str, str] = {}
    if "Attributes:" not in doc:
        return out
    names: list[str] = []
    for line in doc.split("Attributes:", 1)[1].splitlines():
        if not line.strip():
            continue
        head = re.match(r"^ {4}([A-Za-z_][\w, ]*):\s*(.*)$", line)
        if head:
            names = [n.strip() for n in head.group(1).split(",")]
            for name in names:
                out[name] = head.group(2).strip()
        elif line.startswith("        ") and names:
            for name in names:
                out[name] += " " + line.strip()
        elif not line.startswith(" "):
            break
    return out


def _default(f: dataclasses.Field) -> str:
    from omegaconf import MISSING

    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if value == MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, str):
        text = f'"{value}"'
    else:
        text = repr(value)
    return f"`{text}`"


def _md(text: str) -> str:
    """Docstring markup -> markdown (reST literals to code spans, table-safe)."""
    text = re.sub(r":(?:func|mod|class|meth|attr|data):`~?", "`", text)
    return text.replace("``", "`").replace("|", "\\|")


def _section(name: str, cls: type, heading: str | None = None) -> list[str]:
    docs = field_docs(cls)
    summary = _md(" ".join((inspect.getdoc(cls) or "").split("Attributes:", 1)[0].split()))
    hints = typing.get_type_hints(cls)
    title = heading or (f"### `{name}`" if name else "### top level")
    lines = [title, "", summary, "", "| key | default | meaning |",
             "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        sub = hints.get(f.name)
        if dataclasses.is_dataclass(sub) and name == "" and f.name != "algorithm":
            continue  # a section: documented under its own heading
        if f.name == "algorithm" and name == "":
            lines.append("| `algorithm` | | the algorithm section (below); `name` picks the algorithm |")
            continue
        text = _md(docs.get(f.name, ""))
        lines.append(f"| `{f.name}` | {_default(f)} | {text} |")
    return [*lines, ""]


def _recipe(title: str, schema: type, algorithms: list[type]) -> list[str]:
    lines = [f"## {title}", ""]
    lines += _section("", schema)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        sub = hints.get(f.name)
        if f.name != "algorithm" and dataclasses.is_dataclass(sub):
            lines += _section(f.name, sub)
            nested = typing.get_type_hints(sub)
            for g in dataclasses.fields(sub):
                inner = nested.get(g.name)
                if dataclasses.is_dataclass(inner):
                    lines += _section(f"{f.name}.{g.name}", inner)
    for algo in algorithms:
        name = algo.config_class().name
        lines += _section("algorithm", algo.config_class, heading=f"### `algorithm` (`name: {name}`)")
    return lines


def recipe_reference() -> str:
    """The markdown reference of alignment recipes (ReFL, GRPO) and reward-model recipes."""
    from dinalrm_align.algorithms.registry import resolve_algorithm
    from dinalrm_align.rm_training.config import RMTrainConfig
    from dinalrm_align.trainer.config import TrainConfig

    lines = [HEADER]
    lines += _recipe("Alignment recipes (`algorithm.name: refl | grpo`)", TrainConfig,
                     [resolve_algorithm("refl"), resolve_algorithm("grpo")])
    lines += _recipe("Reward-model recipes (`algorithm: reward_model`)", RMTrainConfig, [])
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(recipe_reference())
