"""dinalrm-align: DiNa-LRM, a diffusion-native latent reward model for aligning SD3.5, FLUX.1 and Z-Image.

The public names are imported lazily so that ``import dinalrm_align`` stays cheap
(diffusers/transformers/peft are only imported when a model is built).
"""

from __future__ import annotations

from dinalrm_align._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "LatentRewardModel": "dinalrm_align.reward_model.model",
    "RewardModelConfig": "dinalrm_align.reward_model.config",
    "encode_prompts": "dinalrm_align.reward_model.text",
    "PromptEmbeddingCache": "dinalrm_align.reward_model.text",
    "score_images": "dinalrm_align.reward_model.images",
    "encode_conditioning": "dinalrm_align.reward_model.text",
    "TextConditioning": "dinalrm_align.backbones.conditioning",
    "Features": "dinalrm_align.reward_model.features",
    "get_adapter": "dinalrm_align.backbones.registry",
    "unpack_latents": "dinalrm_align.backbones",
}

__all__ = ["__version__", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
