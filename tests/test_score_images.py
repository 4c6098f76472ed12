"""Scoring decoded images (VAE path) and the `dinalrm-align score` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinalrm_align.cli import main as cli_main
from dinalrm_align.reward_model.images import encode_images, to_pixel_tensors


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_input_forms_agree(tmp_path, tiny_pipe, tiny_rm):
    x = _images()
    uint8 = (x * 255).round().to(torch.uint8)
    x_q = uint8.float() / 255  # what PIL / uint8 inputs carry
    pils = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in uint8]
    paths = []
    for i, img in enumerate(pils):
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    prompts = ["a red cube", "a blue ball"]
    scores = []
    for form in (x_q, pils, paths, uint8.permute(0, 2, 3, 1).numpy()):
        g = torch.Generator().manual_seed(7)
        scores.append(
            tiny_rm.score_images(form, prompts, tiny_pipe, u=0.1, generator=g, max_sequence_length=16)
        )
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0], atol=1e-5, rtol=1e-5)
    assert scores[0].shape == (2,)


def test_vae_latents_follow_sd3_normalisation(tiny_pipe):
    x = _images(1)
    (z,) = encode_images(tiny_pipe, x, sample_posterior=False)
    with torch.no_grad():
        mean = tiny_pipe.vae.encode(x * 2 - 1).latent_dist.mean
    cfg = tiny_pipe.vae.config
    torch.testing.assert_close(z, ((mean - cfg.shift_factor) * cfg.scaling_factor)[0])
    assert z.shape == (16, 32, 32)


def _family(backbone, tiny_pipe, tiny_rm):
    """(pipe, rm) of a family: the shared SD3 fixtures, or fresh tiny FLUX / Z-Image models."""
    if backbone == "sd3":
        return tiny_pipe, tiny_rm
    from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

    pipe = tiny_pipeline(backbone, seed=0)
    return pipe, tiny_reward_model(backbone, pipe, seed=0)


@pytest.mark.parametrize("backbone", ["sd3", "flux", "zimage"])
def test_encode_images_samples_the_posterior_by_default(backbone, tiny_pipe, tiny_rm):
    """Reward models were trained on posterior samples: the default draws one (seedable), or the mean."""
    pipe, _ = _family(backbone, tiny_pipe, tiny_rm)
    x = _images(2, seed=1)
    cfg = pipe.vae.config
    expected = (0.0609, 1.5305) if backbone == "sd3" else (0.1159, 0.3611)
    assert (cfg.shift_factor, cfg.scaling_factor) == expected
    with torch.no_grad():
        dist = pipe.vae.encode(x * 2 - 1).latent_dist
    mean = (dist.mean - cfg.shift_factor) * cfg.scaling_factor
    std = dist.std * cfg.scaling_factor

    def sample(seed):
        return torch.stack(encode_images(pipe, x, generator=torch.Generator().manual_seed(seed)))

    a, b, c = sample(0), sample(0), sample(1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # same generator -> same sample
    assert not torch.allclose(a, c)  # another generator -> another sample
    # each is mean + std * eps with eps ~ N(0, 1): the standardised residual has unit scale
    eps = (a - mean) / std
    assert 0.8 < float(eps.std()) < 1.2 and abs(float(eps.mean())) < 0.1
    # sample_posterior=False is exactly the mean, independent of the generator
    m = encode_images(pipe, x, sample_posterior=False, generator=torch.Generator().manual_seed(0))
    m = torch.stack(m)
    torch.testing.assert_close(m, mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["sd3", "flux", "zimage"])
def test_score_images_samples_the_posterior_by_default(backbone, tiny_pipe, tiny_rm):
    pipe, rm = _family(backbone, tiny_pipe, tiny_rm)
    x = _images(2, seed=2)
    prompts = ["a red cube", "a blue ball"]
    kw = dict(u=0.1, max_sequence_length=16)

    def score(seed, **extra):
        return rm.score_images(x, prompts, pipe, generator=torch.Generator().manual_seed(seed), **kw, **extra)

    a, b, c = score(0), score(0), score(1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    # the posterior sample is what moves the score: with the same re-noising draws, the mean gives another one
    mean_a, mean_b = score(0, sample_posterior=False), score(0, sample_posterior=False)
    torch.testing.assert_close(mean_a, mean_b, atol=0, rtol=0)
    assert not torch.allclose(mean_a, a)
    # sample_posterior=False scores exactly the posterior mean latents
    latents = torch.stack(encode_images(pipe, x, sample_posterior=False))
    from dinalrm_align.reward_model.text import encode_prompts

    pe, pooled = encode_prompts(pipe, prompts, 16)
    with torch.no_grad():
        ref = rm.score(latents, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.1,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mean_a, ref, atol=1e-5, rtol=1e-5)


def test_odd_sizes_are_center_cropped_and_mixed_sizes_scored(tiny_pipe, tiny_rm):
    imgs = [torch.rand(3, 66, 70), torch.rand(3, 64, 64)]
    latents = encode_images(tiny_pipe, imgs)
    assert latents[0].shape == (16, 32, 34) and latents[1].shape == (16, 32, 32)
    out = tiny_rm.score_images(
        imgs, "a red cube", tiny_pipe, generator=torch.Generator().manual_seed(0), max_sequence_length=16
    )
    assert out.shape == (2,) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize(
    "images, match, exc",
    [
        (torch.rand(2, 4, 64, 64), "3 channels", ValueError),
        (torch.rand(2, 3, 64, 64) * 3, r"\[0, 1\]", ValueError),
        (["/no/such/image.png"], "not found", FileNotFoundError),
        ([], "non-empty", ValueError),
        ([42], "unsupported image type", ValueError),
    ],
)
def test_bad_images_raise_clear_errors(images, match, exc):
    with pytest.raises(exc, match=match):
        to_pixel_tensors(images)


def test_prompt_count_mismatch(tiny_pipe, tiny_rm):
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        tiny_rm.score_images(_images(), ["a", "b", "c"], tiny_pipe)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny_pipe, tiny_rm):
    root = tmp_path_factory.mktemp("saved")
    tiny_pipe.save_pretrained(root / "pipe")
    tiny_rm.save_pretrained(root / "rm")
    return root


def test_score_cli_prints_one_json_line_per_image(tmp_path, saved_tiny, capsys):
    paths = []
    for i, img in enumerate((_images(2) * 255).round().to(torch.uint8)):
        paths.append(str(tmp_path / f"i{i}.png"))
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    argv = [
        "score",
        "--model",
        str(saved_tiny / "rm"),
        "--pipeline",
        str(saved_tiny / "pipe"),
        "--prompt",
        "a red cube",
    ]
    argv += ["--max-sequence-length", "16", "--device", "cpu", "--seed", "3", *paths]
    assert cli_main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["image"] for r in lines] == paths
    for r in lines:
        assert set(r) == {"image", "prompt", "raw", "score", "u", "sigma", "seed"}
        assert r["score"] == pytest.approx((r["raw"] + 10) / 10, abs=1e-5)
        assert r["sigma"] == pytest.approx(0.1008, abs=1e-4) and r["seed"] == 3
    # same seed -> same numbers
    assert cli_main(argv) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["raw"] for r in again] == [r["raw"] for r in lines]
    assert np.isfinite([r["raw"] for r in lines]).all()


def test_score_cli_reports_missing_model(tmp_path, saved_tiny, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "red").save(img)
    code = cli_main(
        [
            "score",
            "--model",
            str(tmp_path / "missing"),
            "--pipeline",
            str(saved_tiny / "pipe"),
            "--prompt",
            "x",
            str(img),
        ]
    )
    assert code == 2
    assert "not found" in capsys.readouterr().err


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli_main([]) == 0
    out = capsys.readouterr().out
    for name in ("score", "train", "train-rm", "eval-rm", "serve", "demo"):
        assert name in out
    assert cli_main(["nope"]) == 2
