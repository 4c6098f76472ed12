"""Model cards (``README.md`` next to the trained weights) and the optional upload to the Hugging Face Hub.

A card follows diffusers' LoRA cards: YAML front matter (base model, library, tags), then what was
trained, with which reward and recipe, the final metrics, and a usage snippet that loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["check_push", "policy_card", "push_to_hub", "reward_model_card"]


def _front_matter(base_model: str, tags: list[str]) -> str:
    meta = {"base_model": base_model, "library_name": "diffusers", "license": "other",
            "tags": ["dinalrm-align", "text-to-image", *tags]}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _metrics_table(summary: dict[str, Any]) -> str:
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    keys = [k for k in after if not k.endswith("_std")]
    if not keys:
        return "No evaluation was run.\n"
    rows = ["| metric | before | after |", "|---|---|---|"]
    for key in keys:
        b = before.get(key)
        rows.append(f"| `{key}` | {'' if b is None else f'{b:.4f}'} | {after[key]:.4f} |")
    return "\n".join(rows) + "\n"


def policy_card(config: Any, adapter: Any, algorithm: str, summary: dict[str, Any]) -> str:
    """Card of a policy LoRA (or fully fine-tuned transformer) trained with a latent reward."""
    lora = config.model.finetune == "lora"
    base = config.model.pretrained
    pipe_cls = adapter.pipeline_class_name
    sampling = config.sampling
    call = {"num_inference_steps": sampling.num_steps,
            **adapter.pipeline_guidance_kwargs(sampling.guidance_scale, sampling.embedded_guidance)}
    generate = ("image = pipe(\"a photo of a red fox in the snow\", "
                + ", ".join(f"{k}={v!r}" for k, v in call.items()) + ").images[0]\n")
    if lora:
        usage = (f"import torch\nfrom diffusers import {pipe_cls}\n\n"
                 f"pipe = {pipe_cls}.from_pretrained({base!r}, torch_dtype=torch.bfloat16).to(\"cuda\")\n"
                 f"pipe.load_lora_weights(\"path/to/this/folder\")\n" + generate)
    else:
        usage = (f"import torch\nfrom diffusers import {pipe_cls}, {adapter.transformer_class_name}\n\n"
                 f"transformer = {adapter.transformer_class_name}.from_pretrained(\"path/to/this/folder\", "
                 "torch_dtype=torch.bfloat16)\n"
                 f"pipe = {pipe_cls}.from_pretrained({base!r}, transformer=transformer, torch_dtype=torch.bfloat16)"
                 ".to(\"cuda\")\n" + generate)
    recipe = {
        "algorithm": algorithm, "reward": config.reward.model, "u": config.reward.u,
        "resolution": config.sampling.resolution, "steps": config.sampling.num_steps,
        "guidance_scale": config.sampling.guidance_scale, "lr": config.optim.lr,
        "updates": summary.get("steps"), "seed": config.seed,
    }
    if lora:
        recipe["lora"] = {"r": config.model.lora.r or adapter.policy_lora_rank,
                          "alpha": config.model.lora.alpha or adapter.policy_lora_alpha}
    kind = "LoRA" if lora else "fine-tuned transformer"
    return (
        _front_matter(base, ["lora" if lora else "full-finetune", algorithm, adapter.name])
        + f"\n# {algorithm.upper()} {kind} of `{base}` aligned with a diffusion-native latent reward\n\n"
        f"Trained with dinalrm-align ({algorithm}): the reward "
        f"`{config.reward.model}` scores latents directly (re-noised at sigma ~= {config.reward.u}), no VAE decode.\n\n"
        "## Recipe\n\n```json\n" + json.dumps(recipe, indent=2) + "\n```\n\n"
        "## Evaluation (held-out prompts, fixed seeds, EMA weights)\n\n" + _metrics_table(summary) + "\n"
        "## Usage\n\n```python\n" + usage + "```\n"
    )


def reward_model_card(recipe: Any, rm: Any, summary: dict[str, Any]) -> str:
    """Card of a trained latent reward model."""
    c = rm.config
    usage = ("from diffusers import DiffusionPipeline\nfrom dinalrm_align import LatentRewardModel, encode_prompts\n\n"
             f"pipe = DiffusionPipeline.from_pretrained({c.backbone_model_id!r})\n"
             f"rm = LatentRewardModel.from_pretrained(\"path/to/this/folder\", transformer=pipe.transformer,\n"
             "                                       scheduler_config=pipe.scheduler.config)\n"
             "prompt_embeds, pooled = encode_prompts(pipe, prompts, max_sequence_length="
             f"{recipe.model.max_sequence_length})\n"
             "raw = rm.score(latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, u=0.4)\n")
    arch = {"backbone": c.backbone, "blocks": c.num_transformer_layers, "visual_taps": list(c.visual_head_idx),
            "text_taps": list(c.text_head_idx), "lora": {"r": c.lora_config.r, "alpha": c.lora_config.lora_alpha}}
    return (
        _front_matter(c.backbone_model_id, ["reward-model", "dina-lrm", c.backbone])
        + f"\n# DiNa-LRM latent reward model on `{c.backbone_model_id}`\n\n"
        f"Trained on preference pairs with the {recipe.loss.name} loss (u ~ {recipe.loss.u_sampler}) for "
        f"{summary.get('steps')} updates.\n\n## Architecture\n\n```json\n" + json.dumps(arch, indent=2) + "\n```\n\n"
        "## Pairwise accuracy (evaluation pairs, ties count as wrong)\n\n" + _metrics_table(summary) + "\n"
        "## Usage\n\n```python\n" + usage + "```\n"
    )


def check_push(repo_id: str) -> None:
    """Fail early (before training) when ``repo_id`` is malformed or the Hub cannot be reached by design.

    Raises:
        ValueError: ``repo_id`` is not ``name`` or ``owner/name``.
        ConnectionError: ``HF_HUB_OFFLINE`` is set.
    """
    import os

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"--push-to-hub {repo_id!r} is not a valid Hub repo id: {exc}") from exc
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConnectionError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set (no network); unset it, or "
                              "upload run_dir/final later with `huggingface-cli upload`")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = True, token: str | None = None) -> str:
    """Upload ``folder`` (weights + card) to ``repo_id`` with huggingface_hub; returns the commit URL.

    Raises:
        FileNotFoundError: the folder does not exist or has no model card.
        ConnectionError: the Hub cannot be reached (e.g. ``HF_HUB_OFFLINE=1``), with the reason.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"nothing to upload: {folder} is not a folder")
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no model card (README.md); train to the end first")
    check_push(repo_id)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="dinalrm-align: trained weights")
    except Exception as exc:  # network, auth, permission
        raise ConnectionError(f"could not push {folder} to {repo_id!r}: {type(exc).__name__}: {exc}") from exc
    return str(getattr(info, "commit_url", info))
