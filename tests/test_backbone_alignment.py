"""ReFL and GRPO on every backbone: the tiny FLUX.1 / Z-Image recipes train, their LoRAs load in the matching
diffusers pipeline and change its output, a reward of another family works through the pixel bridge, and
recipes that cannot work are refused at start-up (before any model is loaded where the family is known)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SHORT = ["train.max_steps=3", "eval.every=0", "eval.at_start=false", "checkpoint.every=0", "train.num_threads=1"]


pytestmark = pytest.mark.usefixtures("fresh_trainer_state")


def _trainer(recipe: str, run_dir: Path, *overrides: str):
    from dinalrm_align.trainer.loop import Trainer
    from dinalrm_align.trainer.recipe import load_recipe

    return Trainer(load_recipe(RECIPES / recipe, [f"run_dir={run_dir}", *overrides]), progress=False)


def _generate(pipe, backbone: str) -> torch.Tensor:
    kwargs = {"guidance_scale": 3.5} if backbone == "flux" else {"guidance_scale": 0.0}
    with torch.no_grad():
        return pipe(prompt=["a red cube"], height=32, width=32, num_inference_steps=2, output_type="latent",
                    max_sequence_length=16, generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["flux", "zimage"])
@pytest.mark.parametrize("algorithm", ["refl", "grpo"])
def test_tiny_recipe_trains_and_its_lora_loads_in_the_family_pipeline(tmp_path, backbone, algorithm):
    from dinalrm_align.tiny import tiny_pipeline

    summary = _trainer(f"tiny_{backbone}_{algorithm}.yaml", tmp_path / "run", *SHORT).train()
    assert summary.steps == 3
    record = json.loads((tmp_path / "run" / "summary.json").read_text())
    pipeline_class = {"flux": "FluxPipeline", "zimage": "ZImagePipeline"}[backbone]
    assert record["final_format"] == f"diffusers LoRA: {pipeline_class}.load_lora_weights"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows if "train/loss" in r)
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert pipeline_class in card and "load_lora_weights" in card

    pipe = tiny_pipeline(backbone)
    assert type(pipe).__name__ == pipeline_class
    base = _generate(pipe, backbone)
    pipe.load_lora_weights(str(tmp_path / "run" / "final"))
    assert pipe.get_list_adapters(), "no adapter was loaded"
    tuned = _generate(pipe, backbone)
    assert torch.isfinite(tuned).all()
    assert not torch.allclose(base, tuned, atol=1e-6), "the LoRA does not change the pipeline's output"


@pytest.mark.slow
def test_flux_policy_with_an_sd3_reward_through_the_pixel_bridge(tmp_path):
    """The slow path: FLUX latents -> FLUX VAE decode -> SD3 VAE encode (differentiable) -> SD3 reward."""
    trainer = _trainer("tiny_flux_refl.yaml", tmp_path / "run", *SHORT, "reward.model=tiny-sd3",
                       "reward.bridge=pixels", "sampling.resolution=32")
    trainer.setup()
    ctx = trainer.algorithm.ctx
    assert ctx.reward.bridge is not None and ctx.reward.model.adapter.name == "sd3"
    lora = {n: p.detach().clone() for n, p in ctx.transformer.named_parameters() if "lora_" in n}
    summary = trainer.train()
    assert summary.steps == 3
    changed = [n for n, p in ctx.transformer.named_parameters() if "lora_" in n and not torch.equal(p, lora[n])]
    assert changed, "no gradient reached the policy LoRA through the bridge"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["train/reward_raw_mean"] for r in rows if "train/reward_raw_mean" in r]
    assert rewards and all(torch.isfinite(torch.tensor(rewards)))


def test_bridge_scores_equal_decoding_and_re_encoding_by_hand():
    from dinalrm_align.algorithms.reward_scorer import RewardScorer
    from dinalrm_align.backbones.registry import get_adapter
    from dinalrm_align.reward_model.images import encode_images
    from dinalrm_align.tiny import tiny_pipeline, tiny_reward_model

    flux, sd3 = tiny_pipeline("flux"), tiny_pipeline("sd3")
    fa, sa = get_adapter("flux"), get_adapter("sd3")
    rm = tiny_reward_model("sd3", sd3)
    scorer = RewardScorer(rm, bridge=((flux, fa), (sd3, sa)), max_sequence_length=16)
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    prompts = ["a red cube", "a blue ball"]
    noise = torch.randn(1, 2, *scorer.latent_shape((16, 16, 16)), generator=torch.Generator().manual_seed(2))
    got = scorer.score(latents, None, prompts, u=0.4, noise=noise)
    with torch.no_grad():
        images = fa.decode(flux, latents)
        x0 = torch.stack(encode_images(sd3, images, sample_posterior=False))
        pe, pooled = sa.encode_prompt(sd3, prompts, 16)
        want = rm.score(x0, prompt_embeds=pe, pooled_prompt_embeds=pooled, u=0.4, noise=noise[0])
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        ("tiny_flux_refl.yaml", ["reward.model=tiny-sd3"], "reward.bridge: pixels"),
        ("tiny_zimage_grpo.yaml", ["reward.model=tiny-flux"], "cannot score the policy's latents"),
        ("tiny_flux_refl.yaml", ["reward.model=tiny-sd3", "reward.bridge=pixels", "reward.share_base_weights=true"],
         "share_base_weights"),
        ("tiny_flux_refl.yaml", ["sampling.guidance_scale=4.5", "algorithm.rollout_cfg=true"], "guidance-distilled"),
        ("tiny_flux_grpo.yaml", ["sampling.guidance_scale=4.5", "algorithm.cfg=true"], "guidance-distilled"),
        ("tiny_zimage_refl.yaml", ["sampling.resolution=66"], "multiple of 4"),
        ("refl_flux1dev.yaml", ["sampling.resolution=520"], "multiple of 16"),
        ("refl_flux1dev.yaml", ["reward.model=liuhuohuo/DiNa-LRM-SD35M-12layers"], "is a sd3 reward model"),
        ("refl_zimage_turbo.yaml", ["sampling.guidance_scale=2", "algorithm.rollout_cfg=true",
                                    "sampling.resolution=1000"], "multiple of 16"),
    ],
)
def test_impossible_recipes_are_refused_before_loading(tmp_path, monkeypatch, recipe, overrides, message):
    import dinalrm_align.backbones.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was checked")

    monkeypatch.setattr(loading, "load_any_pipeline", no_loading)
    trainer = _trainer(recipe, tmp_path / "run", *overrides)
    with pytest.raises(ValueError, match=message):
        trainer.preflight()


def test_guidance_distilled_flux_needs_its_guidance_value():
    from dinalrm_align.backbones.conditioning import TextConditioning
    from dinalrm_align.backbones.registry import get_adapter
    from dinalrm_align.tiny import tiny_pipeline

    adapter = get_adapter("flux")
    x = torch.randn(1, 16, 8, 8)
    cond = TextConditioning(torch.randn(1, 4, 32), torch.randn(1, 32))
    dev = tiny_pipeline("flux", guidance_embeds=True).transformer
    with pytest.raises(ValueError, match="guidance-distilled"):
        adapter.velocity(dev, x, 0.5, cond)
    assert adapter.velocity(dev, x, 0.5, cond, guidance=3.5).shape == x.shape
    schnell = tiny_pipeline("flux", guidance_embeds=False).transformer  # ignores a guidance value, as the pipeline
    torch.testing.assert_close(adapter.velocity(schnell, x, 0.5, cond, guidance=3.5), adapter.velocity(schnell, x, 0.5, cond))


def test_family_is_known_before_loading(tmp_path):
    from dinalrm_align.backbones.loading import family_hint

    assert family_hint("tiny") == "sd3" and family_hint("tiny-flux:3") == "flux" and family_hint("tiny-zimage") == "zimage"
    assert family_hint("black-forest-labs/FLUX.1-dev") == "flux"
    assert family_hint("Tongyi-MAI/Z-Image-Turbo") == "zimage"
    assert family_hint("stabilityai/stable-diffusion-3.5-medium") == "sd3"
    assert family_hint("someone/unknown-model") is None
    assert family_hint("someone/unknown-model", backbone="flux") == "flux"
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    assert family_hint(str(folder)) == "zimage"


def test_register_backbone_makes_a_user_adapter_available(monkeypatch):
    from dinalrm_align.backbones import registry
    from dinalrm_align.backbones.sd3 import SD3Adapter

    class MyAdapter(SD3Adapter):
        name = "mine"

    monkeypatch.setattr(registry, "BACKBONES", dict(registry.BACKBONES))
    monkeypatch.setattr(registry, "_CACHE", {})
    registry.register_backbone("mine", MyAdapter)
    assert isinstance(registry.get_adapter("mine"), MyAdapter)
    assert "mine" in registry.backbone_names()
    with pytest.raises(ValueError, match="already registered"):
        registry.register_backbone("mine", MyAdapter)
    with pytest.raises(ValueError, match="not a BackboneAdapter"):
        registry.register_backbone("other", dict)
    registry.register_backbone("byname", "dinalrm_align.backbones.flux:FluxAdapter")
    assert registry.get_adapter("byname").name == "flux"
