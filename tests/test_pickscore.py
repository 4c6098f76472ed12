"""PickScore reward on a tiny offline CLIP model: exact scores, preprocessing, batching, errors, the
proxy-reward / composition plumbing and a GRPO update with "DiNa-LRM + 0.2 x PickScore" advantages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "a blue ball", "a green tree", "a red cube"]
SCALE = 1.0 / 26.0


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPModel + CLIPProcessor (size / crop 32) saved in one folder, built offline."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from dinalrm_align.tiny_tokenizers import _clip_tokenizer

    try:  # transformers 5 without torchvision: the PIL backend (the torchvision class may warn and fall back)
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as ImageProcessor

    tok = _clip_tokenizer()
    common = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **common,
        ),
        vision_config=dict(image_size=32, patch_size=8, **common),
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    image_processor = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(clip_dir):
    from dinalrm_align.rewards.pickscore import make_pickscore

    return make_pickscore(model=clip_dir, processor=clip_dir, device="cpu")


def smooth_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Float (b, 3, h, w) in [0, 1], smooth (so resampling filters agree closely)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 6, 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).clamp(
        0, 1
    )


def hand_scores(folder: Path, pixel_values: torch.Tensor, prompts: list[str], scale: float) -> torch.Tensor:
    """logit_scale.exp() * cos(image, text) * scale from a freshly loaded model."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder).eval()
    tok = AutoProcessor.from_pretrained(folder).tokenizer
    ids = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        img = feats(model.get_image_features(pixel_values=pixel_values))
        txt = feats(model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]))
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return (model.logit_scale.exp() * cos * scale).float()


# ----------------------------------------------------------------------------- scores


def test_scores_equal_hand_computation(clip_dir, scorer):
    images = smooth_images(4, 40, 56)
    scores = scorer(images, PROMPTS, metadata=[{}] * 4, only_strict=True)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert not scores.requires_grad
    expected = hand_scores(clip_dir, scorer.preprocess(images), PROMPTS, SCALE)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)

    from dinalrm_align.rewards.pickscore import make_pickscore

    raw = make_pickscore(model=clip_dir, processor=clip_dir, device="cpu", scale=1.0)(images, PROMPTS)
    torch.testing.assert_close(raw * SCALE, scores, atol=1e-5, rtol=1e-5)


def test_preprocessing_matches_the_processor(scorer):
    """Torch resize / crop / normalise = the processor's own PIL path up to 8-bit rounding of the resize."""
    from PIL import Image

    for h, w in [(32, 32), (40, 56), (64, 48), (20, 24)]:
        images = smooth_images(2, h, w, seed=h)
        mine = scorer.preprocess(images)
        pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
        ref = scorer.processor(images=pil, return_tensors="pt")["pixel_values"]
        assert mine.shape == ref.shape == (2, 3, 32, 32)
        tol = 1e-5 if (h, w) == (32, 32) else 2.5 / 255 / 0.26  # ~2 uint8 levels after normalisation
        assert float((mine - ref).abs().max()) <= tol, (h, w, float((mine - ref).abs().max()))


def test_batch_size_invariance_and_uint8(clip_dir, scorer):
    from dinalrm_align.rewards.pickscore import make_pickscore

    images = smooth_images(5, 36, 36, seed=3)
    prompts = ["a red cube", "a blue ball", "a red cube", "a yellow car", "a blue ball"]
    full = scorer(images, prompts)
    for bs in (1, 2, 3):
        small = make_pickscore(model=clip_dir, processor=clip_dir, device="cpu", batch_size=bs)(
            images, prompts
        )
        torch.testing.assert_close(small, full, atol=1e-5, rtol=1e-5)
    singles = torch.cat([scorer(images[i : i + 1], [p]) for i, p in enumerate(prompts)])
    torch.testing.assert_close(singles, full, atol=1e-5, rtol=1e-5)
    as_uint8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(
        scorer(as_uint8, prompts), full, atol=1e-6, rtol=0
    )  # quantize=True: same pixels
    assert scorer(images[:0], []).shape == (0,)


def test_lazy_export_and_loaded_objects(clip_dir, scorer):
    import dinalrm_align.rewards as rewards
    from dinalrm_align.rewards.pickscore import PickScore, make_pickscore

    assert rewards.make_pickscore is make_pickscore and "make_pickscore" in rewards.__all__
    from transformers import AutoModel

    model = AutoModel.from_pretrained(clip_dir)  # a loaded model is moved / cast in place: use a private one
    again = make_pickscore(model=model, processor=scorer.processor, device="cpu", dtype="bf16")
    assert isinstance(again, PickScore) and again.model is model and again.dtype == torch.bfloat16
    images = smooth_images(2, 32, 32)
    scores = again(images, PROMPTS[:2])
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, scorer(images, PROMPTS[:2]), atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------- errors


def test_missing_and_offline_models_are_clear_errors(clip_dir):
    from dinalrm_align.rewards.pickscore import make_pickscore

    with pytest.raises(FileNotFoundError, match="nobody-here/no-pickscore"):
        make_pickscore(model="nobody-here/no-pickscore", processor=clip_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match="nobody-here/no-processor"):
        make_pickscore(model=clip_dir, processor="nobody-here/no-processor", device="cpu")
    with pytest.raises(FileNotFoundError, match="folder not found"):
        make_pickscore(model=clip_dir / "missing", processor=clip_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match="is a file"):
        make_pickscore(model=clip_dir / "config.json", processor=clip_dir, device="cpu")


def test_bad_inputs_and_options(clip_dir, scorer):
    from dinalrm_align.rewards.pickscore import make_pickscore

    good = smooth_images(2, 32, 32)
    cases = [
        (good.numpy(), ["a", "b"], "torch.Tensor"),
        (good.permute(0, 2, 3, 1), ["a", "b"], r"\(B, 3, H, W\)"),
        (good[0], ["a"], r"\(B, 3, H, W\)"),
        (good * 2 - 1, ["a", "b"], r"\[-1, 1\]"),
        (good * 255, ["a", "b"], r"in \[0, 1\]"),
        (torch.full_like(good, float("nan")), ["a", "b"], "NaN"),
        (good.long(), ["a", "b"], "float"),
        (good, ["a"], "2 images but 1 prompts"),
        (good, "a cat", "list of strings"),
        (good, ["a", 3], "must be strings"),
    ]
    for images, prompts, match in cases:
        with pytest.raises(ValueError, match=match):
            scorer(images, prompts)
    for kwargs, match in [
        ({"batch_size": 0}, "batch_size"),
        ({"dtype": "int8"}, "dtype"),
        ({"scale": 0.0}, "scale"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_pickscore(model=clip_dir, processor=clip_dir, device="cpu", **kwargs)
    with pytest.raises(ValueError, match="CLIPModel"):
        make_pickscore(model=torch.nn.Linear(2, 2), processor=clip_dir, device="cpu")
    with pytest.raises(ValueError, match="CLIPProcessor"):
        make_pickscore(model=clip_dir, processor=object(), device="cpu")


# ----------------------------------------------------------------------------- plumbing


def test_proxy_reward_config(clip_dir, scorer):
    """ReFL's eval.proxy_rewards entry: loaded once by load_proxy_rewards, called per eval batch."""
    from dinalrm_align.trainer.config import load_train_config
    from dinalrm_align.trainer.evaluation import check_proxy_rewards, load_proxy_rewards

    recipe = load_train_config(
        {
            "data": {"prompts": str(REPO / "recipes" / "prompts" / "tiny_prompts.txt")},
            "eval": {
                "proxy_rewards": [
                    {
                        "name": "pickscore",
                        "target": "dinalrm_align.rewards.pickscore:make_pickscore",
                        "inputs": "images",
                        "factory": True,
                        "kwargs": {"model": str(clip_dir), "processor": str(clip_dir), "device": "cpu"},
                    }
                ]
            },
        }
    )
    cfg = recipe.eval
    check_proxy_rewards(cfg.proxy_rewards)  # the preflight's cheap import check
    (proxy,) = load_proxy_rewards(cfg.proxy_rewards)
    images = smooth_images(4, 32, 32)
    values = proxy(images, PROMPTS)
    assert proxy.name == "pickscore" and len(values) == 4
    np.testing.assert_allclose(values, scorer(images, PROMPTS).double().numpy(), atol=1e-6)


def test_composition_builtin_type_on_latents(clip_dir, scorer, tiny_pipe):
    from dinalrm_align.backbones.registry import adapter_for
    from dinalrm_align.rewards import build_composite
    from dinalrm_align.rewards.composition import REWARD_TYPES

    assert "pickscore" in REWARD_TYPES
    comp = build_composite(
        [
            {
                "name": "pickscore",
                "type": "pickscore",
                "weight": 0.2,
                "kwargs": {"model": str(clip_dir), "processor": str(clip_dir)},
            }
        ],
        context={"pipeline": tiny_pipe, "device": "cpu"},
    )
    latents = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    out = comp(latents=latents, prompts=PROMPTS[:3])
    expected = scorer(adapter_for(tiny_pipe).decode(tiny_pipe, latents), PROMPTS[:3])
    torch.testing.assert_close(out["pickscore"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["avg"], 0.2 * expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs"):
        comp(latents=latents)


def test_grpo_with_pickscore_extra_reward(tmp_path, clip_dir, fresh_trainer_state):
    """The recipe's reward mix on the tiny models: DiNa-LRM advantage + 0.2 x PickScore advantage."""
    from dinalrm_align.algorithms.advantages import compute_advantages
    from dinalrm_align.trainer.config import load_train_config
    from dinalrm_align.trainer.loop import Trainer
    from dinalrm_align.trainer.metrics import MetricBuffer

    cfg = load_train_config(
        REPO / "recipes" / "tiny_grpo.yaml",
        [
            f"data.prompts={REPO / 'recipes' / 'prompts' / 'tiny_prompts.txt'}",
            f"run_dir={tmp_path}",
            "sampling.resolution=32",
            "sampling.num_steps=4",
            "algorithm.sde_window_size=1",
            "algorithm.sde_window_range=[0,2]",
            "train.batch_size=4",
            "train.max_steps=1",
            "eval.at_start=false",
            "eval.at_end=false",
            "eval.every=0",
            "checkpoint.every=0",
            "algorithm.extra_rewards=[{name: pickscore, target: 'dinalrm_align.rewards.pickscore:make_pickscore', "
            f"factory: true, inputs: images, kwargs: {{model: '{clip_dir}', processor: '{clip_dir}', device: cpu}}}}]",
            "algorithm.reward_weights={dina_lrm: 1.0, pickscore: 0.2}",
            "algorithm.advantage_mode=per_component",
        ],
    )
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    buffer = MetricBuffer()
    assert trainer._update(buffer)
    metrics = {f"train/{k}": v for k, v in buffer.reduce(trainer.accelerator).items()}
    for key in (
        "reward_pickscore_mean",
        "reward_pickscore_std",
        "reward_dina_lrm_mean",
        "reward_weighted_mean",
    ):
        assert f"train/{key}" in metrics and np.isfinite(metrics[f"train/{key}"]), key
    roll = trainer.algorithm.last_rollout
    comps = roll["components"]
    assert comps["pickscore"].shape == comps["dina_lrm"].shape == (8,)
    assert float(comps["pickscore"].std()) > 0
    c = cfg.algorithm
    mixed = compute_advantages(
        comps,
        roll["group_ids"],
        {"dina_lrm": 1.0, "pickscore": 0.2},
        mode="per_component",
        global_std=c.global_std,
        adv_clip_max=c.adv_clip_max,
    )
    alone = compute_advantages(
        comps,
        roll["group_ids"],
        {"dina_lrm": 1.0},
        mode="per_component",
        global_std=c.global_std,
        adv_clip_max=c.adv_clip_max,
    )
    torch.testing.assert_close(roll["advantages"], mixed.advantages)
    assert not torch.allclose(mixed.advantages, alone.advantages)
