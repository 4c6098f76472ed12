"""Tiny, fully offline SD3.5-style models for tests, the demo and benchmarks.

Everything here is built from configs in memory (no hub access, no files needed). The tiny
pipeline keeps every structural trait of SD3.5-Medium that the reward model relies on: dual
attention blocks (``attn2``) in the early layers, RMS qk-norm, a ``context_pre_only`` last
block, three text encoders (two CLIP with projection, one T5) and a 16-channel VAE whose latents
follow the SD3 ``(z - shift) * scale`` convention.

Shapes of the default tiny pipeline: images 64x64 <-> latents (B, 16, 32, 32); transformer inner
dim 32 (4 heads x 8), 6 blocks (0-2 dual attention); joint text width 32, pooled width 64.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusion3Pipeline

    from dinalrm_align.reward_model.model import LatentRewardModel

#: Words that the tiny tokenizers know as whole tokens (colour-world prompts use them).
TINY_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "photo",
    "painting",
    "red",
    "green",
    "blue",
    "yellow",
    "cyan",
    "magenta",
    "white",
    "black",
    "orange",
    "purple",
    "cube",
    "ball",
    "car",
    "house",
    "tree",
    "cat",
    "dog",
    "flower",
    "bird",
    "boat",
    "cup",
    "chair",
    "apple",
    "hat",
    "sky",
    "girl",
)

TINY_TRANSFORMER_KWARGS: dict[str, Any] = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=6,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=64,
    out_channels=16,
    pos_embed_max_size=32,
    qk_norm="rms_norm",
    dual_attention_layers=(0, 1, 2),
)

#: Model section of a tiny reward-model config (same keys as the released ``config.json``).
TINY_REWARD_MODEL_SECTION: dict[str, Any] = {
    "model_type": "thurstone",
    "backbone_model_id": "tiny-sd3",
    "num_transformer_layers": 4,
    "freeze_backbone": False,
    "use_lora": True,
    "use_text_features": True,
    "lora_config": {"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian"},
    "use_logistic": False,
    "visual_head_idx": [2, 4],
    "text_head_idx": [2, 4],
    "use_t_embed": True,
    "reward_head": {
        "use_proj_in": False,
        "width": -1,
        "out_dim": 1,
        "num_queries": 4,
        "num_attn_heads": 4,
        "dropout": 0.0,
    },
}


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"]:
        vocab[tok] = len(vocab)
    for ch in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        # Build each known word left to right from characters with one merge per character.
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + "</w>" if i == len(word) - 1 else ch
            merged = prefix + piece
            if (prefix, piece) not in merges:
                merges.append((prefix, piece))
            vocab.setdefault(merged, len(vocab))
            prefix = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in TINY_WORDS]
    pieces += [("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_lowercase + string.digits + ".,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_sd3_pipeline(seed: int = 0, num_layers: int = 6) -> StableDiffusion3Pipeline:
    """Build a random tiny SD3.5-style ``StableDiffusion3Pipeline`` (CPU, fp32, eval mode).

    Deterministic given ``seed``. 64x64 images, latents ``(B, 16, 32, 32)``.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    g_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        kwargs = dict(TINY_TRANSFORMER_KWARGS, num_layers=num_layers)
        kwargs["dual_attention_layers"] = tuple(
            i for i in kwargs["dual_attention_layers"] if i < num_layers - 1
        )
        transformer = SD3Transformer2DModel(**kwargs)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        tok = _clip_tokenizer()
        tok2 = _clip_tokenizer()
        clip_kwargs = dict(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="gelu",
        )
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_kwargs))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_kwargs))
        tok3 = _t5_tokenizer()
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tok3),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                dropout_rate=0.0,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tok,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tok2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tok3,
        )
    finally:
        torch.random.set_rng_state(g_state)
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.eval()
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_reward_model_config(**overrides: Any) -> dict[str, Any]:
    """A full tiny config dict ``{"model": ..., "training": {"add_noise": True}}``.

    ``overrides`` update the model section (shallow).
    """
    import copy

    model = copy.deepcopy(TINY_REWARD_MODEL_SECTION)
    model.update(overrides)
    return {"model": model, "training": {"add_noise": True}}


def tiny_reward_model(
    transformer=None,
    seed: int = 0,
    scheduler_config: dict[str, Any] | None = None,
    share_base_weights: bool = False,
    randomize_zero_init: bool = True,
    **overrides: Any,
) -> LatentRewardModel:
    """A randomly initialised tiny :class:`LatentRewardModel` on the tiny pipeline's transformer.

    With ``randomize_zero_init`` the zero-initialised layers (FiLM condition output, value
    gates, LoRA ``B``) get small random values so that every part of the model influences the
    score (useful for tests of gradients and of checkpoint round trips).
    """
    from dinalrm_align.reward_model.model import LatentRewardModel

    if transformer is None:
        transformer = tiny_sd3_pipeline(seed).transformer
    config = tiny_reward_model_config(**overrides)
    g_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed + 1)
        rm = LatentRewardModel.from_config(
            config,
            transformer=transformer,
            scheduler_config=scheduler_config,
            share_base_weights=share_base_weights,
        )
        if randomize_zero_init:
            with torch.no_grad():
                for name, p in rm.named_parameters():
                    trainable_part = name.startswith("reward_head.") or "lora_" in name
                    if trainable_part and p.dim() > 0 and torch.count_nonzero(p) == 0:
                        p.normal_(0.0, 0.05)
    finally:
        torch.random.set_rng_state(g_state)
    return rm.eval()
