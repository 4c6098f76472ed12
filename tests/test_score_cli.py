"""`dinalrm-align score` on the tiny built-in models of every backbone (offline), and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dinalrm_align.cli import main as cli_main
from dinalrm_align.reward_model.model import LatentRewardModel
from dinalrm_align.tiny import tiny_pipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """A 64x64 and a 72x80 PNG (the second is centre-cropped to the latent grid)."""
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, (h, w) in enumerate(((64, 64), (72, 80))):
        array = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(array).save(paths[-1])
    return paths


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.strip().splitlines()]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("dinalrm-align score: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("model,family", [("tiny", "sd3"), ("tiny-flux", "flux"), ("tiny-zimage", "zimage")])
def test_score_prints_one_json_line_per_image(model, family, image_files, capsys):
    argv = ["score", "--model", model, "--prompt", "a cat", "--seed", "3", "--device", "cpu", *image_files]
    assert cli_main(argv) == 0
    lines = _lines(capsys.readouterr().out)
    assert [r["image"] for r in lines] == image_files
    for r in lines:
        assert set(r) == {"image", "prompt", "raw", "score", "u", "sigma", "seed"}
        assert r["prompt"] == "a cat" and r["u"] == 0.1 and r["seed"] == 3
        assert r["score"] == pytest.approx((r["raw"] + 10) / 10, abs=1e-5)
    # the same numbers as the Python API with that seed (pipeline defaults to the same tiny id)
    pipe = tiny_pipeline(family, seed=0)
    rm = LatentRewardModel.from_pretrained(model, transformer=pipe.transformer, scheduler_config=pipe.scheduler.config)
    assert rm.adapter.name == family
    raw = rm.score_images(image_files, "a cat", pipe, u=0.1, generator=torch.Generator().manual_seed(3))
    assert [r["raw"] for r in lines] == pytest.approx(raw.tolist(), abs=2e-6)
    assert lines[0]["sigma"] == pytest.approx(float(rm.sigma_for(0.1)[0][0]), abs=1e-6)


def test_score_errors_are_one_line_with_a_nonzero_exit(image_files, tmp_path, capsys):
    missing = str(tmp_path / "missing.png")
    assert cli_main(["score", "--model", "tiny", "--prompt", "a cat", image_files[0], missing]) == 2
    assert missing in _one_line_error(capsys.readouterr().err)

    assert cli_main(["score", "--model", "tiny-foo", "--prompt", "a cat", image_files[0]]) == 2
    assert "unknown tiny model 'tiny-foo'" in _one_line_error(capsys.readouterr().err)

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a PNG")
    assert cli_main(["score", "--model", "tiny", "--prompt", "a cat", str(not_an_image)]) == 2
    assert "notes.png" in _one_line_error(capsys.readouterr().err)

    assert cli_main(["score", "--model", "tiny-flux", "--pipeline", "tiny-zimage", "--prompt", "x", image_files[0]]) == 2
    assert "FluxTransformer2DModel" in _one_line_error(capsys.readouterr().err)

    assert cli_main(["score", "--model", str(tmp_path / "nope"), "--prompt", "x", image_files[0]]) == 2
    assert "not found" in _one_line_error(capsys.readouterr().err)

    two_prompts = ["--prompt", "a", "--prompt", "b", "--prompt", "c"]
    assert cli_main(["score", "--model", "tiny", *two_prompts, *image_files]) == 2
    assert "one per image" in _one_line_error(capsys.readouterr().err)
