"""Every example runs end to end on the tiny models (``--tiny``) within a time limit.

Each example's ``main(["--tiny"])`` runs in-process on a worker thread (no interpreter start-up
per example, so the suite stays fast on 2 cores); one example also runs as a real script.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
#: example -> a key that must appear in one of its JSON output lines
EXAMPLES = {
    "score_images.py": "image",
    "score_latents.py": "settings",
    "flow_grpo_plugin.py": "latent_reward_avg",
    "ddpo_plugin.py": "reward_calls",
    "remote_reward.py": "remote_equals_local",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run_main(name: str, argv: list[str]) -> tuple[int, str]:
    """Import ``examples/<name>`` and run its ``main(argv)`` with a timeout; (exit code, stdout)."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["rc"] = module.main(argv)
        except BaseException as exc:  # reported by the test below
            result["exc"] = exc

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        worker.join(TIMEOUT_S)
    assert not worker.is_alive(), f"{name} did not finish within {TIMEOUT_S} s"
    if "exc" in result:
        raise AssertionError(f"{name} raised") from result["exc"]  # type: ignore[misc]
    return int(result["rc"] or 0), out.getvalue()  # type: ignore[call-overload]


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs_with_tiny_models(name):
    rc, stdout = _run_main(name, ["--tiny"])
    assert rc == 0, stdout[-2000:]
    records = _records(stdout)
    assert any(EXAMPLES[name] in r for r in records), stdout[-2000:]
    if name == "remote_reward.py":
        assert records[-1] == {"remote_equals_local": True}
    if name == "ddpo_plugin.py":
        (summary,) = [r for r in records if "reward_calls" in r]
        assert summary["reward_calls"] and all(
            c["images"][1:] == [3, 32, 32] for c in summary["reward_calls"]
        )
    if name == "score_latents.py":  # per-sample seeded: a second run prints the same scores
        assert _records(_run_main(name, ["--tiny"])[1]) == records


#: (example, backbone): each example with a ``--backbone`` option also runs on a FLUX.1 or Z-Image tiny model
BACKBONE_RUNS = [
    ("score_latents.py", "flux"),
    ("score_images.py", "zimage"),
    ("flow_grpo_plugin.py", "zimage"),
    ("remote_reward.py", "flux"),
    ("remote_reward.py", "zimage"),
]


@pytest.mark.parametrize("name,backbone", BACKBONE_RUNS)
def test_example_runs_on_other_backbones(name, backbone):
    rc, stdout = _run_main(name, ["--tiny", "--backbone", backbone])
    assert rc == 0, stdout[-2000:]
    records = _records(stdout)
    if name == "score_latents.py":
        assert records[-1]["settings"]["backbone"] == backbone
        scores = [r["score"] for r in records[:-1]]
        assert len(scores) == 2 and all(math.isfinite(x) for x in scores)
    elif name == "score_images.py":
        assert len(records) == 2 and all(r["backbone"] == backbone and math.isfinite(r["score"]) for r in records)
    elif name == "flow_grpo_plugin.py":
        (summary,) = [r for r in records if "avg_per_sample" in r]
        assert summary["backbone"] == backbone and len(summary["avg_per_sample"]) == 4
        assert any("latent_reward_avg" in r for r in records)
    else:
        assert records[0]["server"]["backbone"] == backbone
        assert records[-1] == {"remote_equals_local": True}


def test_example_runs_as_a_script():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "score_latents.py"), "--tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(_records(result.stdout)) == 3
