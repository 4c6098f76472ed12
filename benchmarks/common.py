"""One import for the benchmark scripts: ``from benchmarks import common as C``.

The pieces live in cohesive modules; this facade re-exports their public names so the scripts (and
the tests) keep a single namespace:

* ``benchmarks.configs``  -- published SD3.5 / CLIP-H / Qwen2-VL configs and the ``full`` / ``small`` /
  ``tiny`` presets;
* ``benchmarks.builders`` -- builders on any device (meta included), inputs, the SD3 transformer call,
  VAE decode;
* ``benchmarks.scorers``  -- the pixel rewards (CLIP-H, Qwen2-VL with its 28 px rounding);
* ``benchmarks.counting`` -- FLOP counting, parameter counts, the ReFL rollout arithmetic;
* ``benchmarks.output``   -- markdown tables, JSON, doc sections.

FLUX.1-dev and Z-Image-Turbo are in ``benchmarks.families``.
"""

from __future__ import annotations

from benchmarks.builders import (
    add_policy_lora,
    build_clip,
    build_reward_model,
    build_sd3_text_encoders,
    build_transformer,
    build_vae,
    build_vlm,
    creation,
    frozen,
    sd3_inputs,
    text_tokens,
    transformer_velocity,
    vae_decode,
)
from benchmarks.configs import (
    CLIP_MEAN,
    CLIP_STD,
    CLIP_VIT_H_14,
    DINA_LRM_MODEL,
    POLICY_LORA_TARGETS,
    QWEN2_VL_7B,
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    QWEN_RESIZE_FACTOR,
    REPO_ROOT,
    SD3_CLIP_G_TEXT,
    SD3_CLIP_L_TEXT,
    SD3_T5_XXL_ENCODER,
    SD35_MEDIUM_TRANSFORMER,
    SD35_VAE,
    VLM_TEXT_TOKENS,
    Preset,
    get_preset,
)
from benchmarks.counting import (
    FlopCount,
    count_flops,
    expected_rollout_steps,
    module_forward_flops,
    param_count,
    skip_finite_checks_on_meta,
    unique_param_bytes,
    unused_output_flops,
)
from benchmarks.output import md_table, replace_doc_section, tflops, write_json
from benchmarks.scorers import clip_score, qwen_grid, vlm_image_tokens, vlm_score

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "CLIP_VIT_H_14", "DINA_LRM_MODEL", "POLICY_LORA_TARGETS", "QWEN2_VL_7B",
    "QWEN_MAX_PIXELS", "QWEN_MIN_PIXELS", "QWEN_RESIZE_FACTOR", "REPO_ROOT", "SD35_MEDIUM_TRANSFORMER",
    "SD35_VAE", "SD3_CLIP_G_TEXT", "SD3_CLIP_L_TEXT", "SD3_T5_XXL_ENCODER", "VLM_TEXT_TOKENS", "FlopCount",
    "Preset", "add_policy_lora", "build_clip", "build_reward_model", "build_sd3_text_encoders",
    "build_transformer", "build_vae", "build_vlm", "clip_score", "count_flops", "creation",
    "expected_rollout_steps", "frozen", "get_preset", "md_table", "module_forward_flops", "param_count",
    "qwen_grid", "replace_doc_section", "sd3_inputs", "skip_finite_checks_on_meta", "text_tokens", "tflops",
    "transformer_velocity", "unique_param_bytes", "unused_output_flops", "vae_decode", "vlm_image_tokens",
    "vlm_score", "write_json",
]  # fmt: skip
