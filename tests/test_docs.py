"""Every code block of the README and docs/ is exercised.

* ``python`` blocks run as they are (they use the tiny built-in ids), in a fresh interpreter with
  ``HF_HUB_OFFLINE=1``. A block that shows the real models is preceded by an HTML comment (invisible
  when rendered) that says what to do with it:

  - ``<!-- doctest: tiny -->``: run it with the real model ids mapped to the tiny built-in models
    (``from_pretrained`` of the SD3.5 / FLUX.1 / Z-Image pipelines and of the published reward model is
    redirected to ``tiny`` / ``tiny-flux`` / ``tiny-zimage``; ``"cuda"`` -> ``"cpu"``, bf16 -> fp32);
  - ``<!-- doctest: replace {"text": "replacement", ...} -->``: run it after these substitutions;
  - ``<!-- doctest: check -->``: do not run it; its imports must resolve, every attribute it reads from an
    imported name must exist and every keyword it passes to an imported callable must be accepted.

* ``bash`` blocks: every ``dinalrm-align`` command names a real command and only options it accepts;
  every recipe it names loads (with its ``key=value`` overrides); ``python -m`` modules and ``make``
  targets exist; ``accelerate launch --config_file`` files exist.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!--\s*doctest:\s*(?P<directive>.*?)\s*-->\s*\n)?```(?P<lang>\w+)?\n(?P<code>.*?)```", re.S)


def _blocks(lang: str) -> list[tuple[str, str, str]]:
    """``(id, directive, code)`` of every ``lang`` block."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            if (match.group("lang") or "") != lang:
                continue
            line = text[: match.start("code")].count("\n") + 1
            out.append((f"{path.relative_to(REPO)}:{line}", (match.group("directive") or "").strip(), match.group("code")))
    return out


PYTHON = _blocks("python")
BASH = _blocks("bash") + _blocks("sh") + _blocks("shell") + _blocks("console")


def test_docs_have_code_blocks():
    assert len(PYTHON) >= 5 and len(BASH) >= 5


# ------------------------------------------------------------------------------------------- python
#: Prepended to ``tiny`` blocks: real ids -> tiny models, without touching the code under test.
TINY_PRELUDE = """
import diffusers, dinalrm_align
from dinalrm_align.tiny import tiny_pipeline
from dinalrm_align.reward_model.model import LatentRewardModel as _RM
_FAMILY = {"stabilityai/stable-diffusion-3.5-medium": "sd3", "black-forest-labs/FLUX.1-dev": "flux",
           "Tongyi-MAI/Z-Image-Turbo": "zimage"}
def _tiny_pipe(orig):
    def from_pretrained(cls, name, *args, **kwargs):
        if str(name) in _FAMILY:
            return tiny_pipeline(_FAMILY[str(name)])
        return orig.__func__(cls, name, *args, **kwargs)
    return classmethod(from_pretrained)
for _cls in ("DiffusionPipeline", "StableDiffusion3Pipeline", "FluxPipeline", "ZImagePipeline"):
    _klass = getattr(diffusers, _cls)
    _klass.from_pretrained = _tiny_pipe(_klass.from_pretrained)
_rm_orig = _RM.from_pretrained
def _rm_from_pretrained(cls, name, *args, **kwargs):
    if str(name) == "liuhuohuo/DiNa-LRM-SD35M-12layers":
        name = "tiny"
    return _rm_orig.__func__(cls, name, *args, **kwargs)
_RM.from_pretrained = classmethod(_rm_from_pretrained)
"""


def _runnable(directive: str, code: str) -> str | None:
    if directive == "check":
        return None
    if directive == "tiny":
        return TINY_PRELUDE + code.replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32")
    if directive.startswith("replace"):
        for old, new in json.loads(directive[len("replace"):]).items():
            code = code.replace(old, new)
    elif directive:
        raise AssertionError(f"unknown doctest directive {directive!r}")
    return code


@pytest.mark.parametrize(("where", "directive", "code"), [b for b in PYTHON if b[1] != "check"],
                         ids=[b[0] for b in PYTHON if b[1] != "check"])
def test_python_block_runs(tmp_path, where, directive, code):
    script = tmp_path / "block.py"
    script.write_text(_runnable(directive, code))
    for name in ("recipes", "examples"):  # blocks use repository-relative paths; outputs stay in tmp_path
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{where} failed:\n{proc.stderr[-3000:]}"


def _imported_names(tree: ast.AST) -> dict[str, object]:
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = importlib.import_module(alias.name.split(".")[0])
    return names


def _resolve(node: ast.AST, names: dict[str, object]) -> object | None:
    """The object an ``a.b.c`` expression rooted at an imported name refers to (None: not resolvable)."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, names)
        if base is None:
            return None
        if isinstance(base, type(sys)) and not hasattr(base, node.attr):
            try:  # a submodule
                return importlib.import_module(f"{base.__name__}.{node.attr}")
            except ImportError:
                pass
        assert hasattr(base, node.attr), f"{ast.unparse(node.value)} has no attribute {node.attr!r}"
        return getattr(base, node.attr)
    return None


@pytest.mark.parametrize(("where", "directive", "code"), [b for b in PYTHON if b[1] == "check"],
                         ids=[b[0] for b in PYTHON if b[1] == "check"])
def test_python_block_names_exist(where, directive, code):
    tree = ast.parse(code)
    names = _imported_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            _resolve(node, names)
        if isinstance(node, ast.Call):
            target = _resolve(node.func, names)
            if target is None or not callable(target):
                continue
            try:
                params = inspect.signature(target).parameters
            except (TypeError, ValueError):
                continue
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                continue
            for kw in node.keywords:
                if kw.arg is not None:
                    assert kw.arg in params, f"{where}: {ast.unparse(node.func)} takes no keyword {kw.arg!r}"


# --------------------------------------------------------------------------------------------- bash
def _commands(code: str) -> list[list[str]]:
    text = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:  # split on ; && || outside quotes
            if token in (";", "&&", "||", "|", "&"):
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # env assignments
                    words = words[1:]
                if words:
                    out.append(words)
                words = []
            else:
                words.append(token)
    return out


def _options(parser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _command_parser(name: str):
    from dinalrm_align.cli import COMMANDS

    module_name = COMMANDS[name][0].split(":")[0]
    module = importlib.import_module(module_name)
    for attr in ("build_parser", f"build_{name.replace('-', '_')}_parser"):
        if hasattr(module, attr):
            return getattr(module, attr)()
    builders = [v for k, v in vars(module).items() if k.startswith(("build_", "_parser", "make_parser")) and callable(v)]
    return builders[0]() if len(builders) == 1 else None


def _check_recipe(recipe: str, overrides: list[str], where: str) -> None:
    from dinalrm_align.trainer.recipe import load_recipe

    path = REPO / recipe
    if not path.is_file():
        return  # a user's own recipe (e.g. my_recipe.yaml)
    load_recipe(path, [o for o in overrides if "=" in o and not o.startswith("-")])


def _check_train_args(args: list[str], where: str, default_algorithm: str = "refl") -> None:
    from dinalrm_align.trainer.cli import build_parser

    parsed = build_parser().parse_intermixed_args(args)
    _check_recipe(parsed.recipe, list(parsed.overrides) + list(parsed.set_overrides), where)


@pytest.mark.parametrize(("where", "directive", "code"), BASH, ids=[b[0] for b in BASH])
def test_bash_block_commands_exist(where, directive, code):
    from dinalrm_align.cli import COMMANDS

    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    for words in _commands(code):
        head = words[0]
        if head == "dinalrm-align":
            name = words[1]
            assert name in COMMANDS, f"{where}: unknown command {name!r}"
            if name in ("train", "train-rm"):
                _check_train_args(words[2:], where)
                continue
            parser = _command_parser(name)
            if parser is not None:
                known = _options(parser)
                for word in words[2:]:
                    if word.startswith("--"):
                        assert word.split("=", 1)[0] in known, f"{where}: `dinalrm-align {name}` has no option {word}"
        elif head == "make":
            for target in words[1:]:
                assert target in targets, f"{where}: no make target {target!r}"
        elif head in ("python", "python3") and len(words) > 2 and words[1] == "-m":
            module = words[2]
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
            if module in ("dinalrm_align.train", "dinalrm_align.rm_training"):
                _check_train_args(words[3:], where)
        elif head == "accelerate" and len(words) > 1 and words[1] == "launch":
            if "--config_file" in words:
                config = words[words.index("--config_file") + 1]
                assert (REPO / config).is_file(), f"{where}: no accelerate config {config}"
            if "--deepspeed_config_file" in words:
                assert (REPO / words[words.index("--deepspeed_config_file") + 1]).is_file()
            if "-m" in words:
                i = words.index("-m")
                assert importlib.util.find_spec(words[i + 1]) is not None, f"{where}: no module {words[i + 1]}"
                if words[i + 1] in ("dinalrm_align.train", "dinalrm_align.rm_training"):
                    _check_train_args(words[i + 2:], where)
