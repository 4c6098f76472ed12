"""The frozen reward a policy is aligned with: a latent reward model, applied to the policy's latents.

Two paths, chosen from the recipe:

* **latent** (the fast path): the reward model sits on the policy's own model family (DiNa-LRM on FLUX
  for a FLUX policy): it scores the policy latents directly, with the policy's text conditioning.
* **pixel bridge** (``reward.bridge: pixels``, the slow path): the reward model belongs to another
  family (an SD3.5 reward for a FLUX policy): latents are decoded by the policy's VAE, re-encoded by the
  reward family's VAE (posterior mean, differentiable, so ReFL still back-propagates) and the prompts
  are encoded by the reward family's text stack.

The reward runs in its own dtype (fp32 by default) outside the run's autocast, as the DiNa-LRM alignment
recipes do, unless ``reward.autocast: true``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from dinalrm_align.backbones.conditioning import TextConditioning

__all__ = ["RewardScorer", "build_reward_scorer", "check_reward_spec"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


#: Published reward models whose family is known without reading their config.
KNOWN_REWARD_MODELS = {"liuhuohuo/dina-lrm-sd35m-12layers": "sd3"}


def _reward_family(spec: str, policy_family: str | None) -> str | None:
    """The family of a reward spec without loading weights (``tiny`` = the policy's own family): tiny ids,
    a local folder's config, a hub id's config already in the local cache, or a known published id."""
    from dinalrm_align.tiny_pipelines import parse_tiny_id

    if spec == "tiny" or spec.startswith("tiny:"):
        return policy_family
    parsed = parse_tiny_id(spec)
    if parsed is not None:
        return parsed[0]
    config = _cached_reward_config(spec)
    if config is not None:
        from dinalrm_align.reward_model.config import RewardModelConfig

        try:
            return RewardModelConfig.from_file(config).backbone
        except (OSError, ValueError):
            return None  # a broken config is reported, with its path, when the model loads
    return KNOWN_REWARD_MODELS.get(spec.lower())


def _cached_reward_config(spec: str) -> Path | None:
    """The config file of a local reward-model folder, or of a hub id in the local cache (never downloads)."""
    from dinalrm_align.reward_model.checkpoint import CONFIG_NAMES

    folder = Path(spec).expanduser()
    if folder.is_dir():
        return next((folder / n for n in CONFIG_NAMES if (folder / n).is_file()), None)
    if spec.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in CONFIG_NAMES:
            found = try_to_load_from_cache(spec, name)
            if isinstance(found, str):
                return Path(found)
    except Exception:  # noqa: BLE001 - a malformed id or cache: unknown family, decided after loading
        return None
    return None


def check_reward_spec(recipe: Any) -> None:
    """Cheap preflight of the ``reward`` section: folders exist; a tiny reward of another family needs the bridge."""
    from dinalrm_align.backbones.loading import family_hint, looks_local
    from dinalrm_align.tiny_pipelines import parse_tiny_id

    spec = recipe.reward.model
    parse_tiny_id(spec)  # ValueError for a bad tiny id
    path = Path(spec).expanduser()
    if parse_tiny_id(spec) is None and not path.exists() and looks_local(spec):
        raise FileNotFoundError(f"reward model folder not found: {spec} (reward.model)")
    policy_family = family_hint(recipe.model.pretrained, recipe.model.backbone)
    reward_family = _reward_family(spec, policy_family)
    if policy_family and reward_family and reward_family != policy_family and recipe.reward.bridge == "none":
        raise ValueError(
            f"reward.model {spec!r} is a {reward_family} reward model and the policy is {policy_family}: it cannot score "
            "the policy's latents directly; set reward.bridge: pixels (decode + re-encode, the slow path) or use a "
            f"{policy_family} reward model"
        )
    if policy_family and reward_family and reward_family != policy_family and recipe.reward.share_base_weights:
        raise ValueError(f"reward.share_base_weights: true needs a reward model of the policy's own family "
                         f"({policy_family}); {spec!r} is a {reward_family} reward model: set it to false")


class RewardScorer:
    """Scores clean policy latents with a frozen latent reward model (see the module docstring)."""

    def __init__(self, model: Any, *, autocast: bool = False, bridge: tuple[Any, Any] | None = None,
                 max_sequence_length: int = 128) -> None:
        self.model = model
        self.autocast = autocast
        self.bridge = bridge  # (policy pipeline + adapter) -> (reward pipeline + adapter)
        self.max_sequence_length = max_sequence_length
        self._bridge_text: Any = None  # prompt-embedding cache of the reward family's text stack

    def latent_shape(self, policy_latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape of the reward's re-noising noise."""
        if self.bridge is None:
            return tuple(policy_latent_shape)
        (ppipe, padapter), (rpipe, radapter) = self.bridge
        _, h, w = policy_latent_shape
        pf, rf = padapter.vae_scale_factor(ppipe), radapter.vae_scale_factor(rpipe)
        return (radapter.latent_channels(rpipe.transformer), h * pf // rf, w * pf // rf)

    def _context(self) -> contextlib.AbstractContextManager:
        if self.autocast:
            return contextlib.nullcontext()
        device_type = self.model.device.type
        return torch.autocast(device_type=device_type, enabled=False)

    def _bridge(self, latents: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, TextConditioning]:
        from dinalrm_align.reward_model.text import PromptEmbeddingCache, encode_conditioning

        if self._bridge_text is None:
            self._bridge_text = PromptEmbeddingCache()

        (ppipe, padapter), (rpipe, radapter) = self.bridge  # type: ignore[misc]
        vae = ppipe.vae
        shift, scale = padapter.latent_norm(vae)
        pixels = vae.decode(latents.to(vae.dtype) / scale + shift, return_dict=False)[0].clamp(-1, 1)
        reward_latents = radapter.encode_pixels(rpipe.vae, pixels, sample=False)
        cond = encode_conditioning(rpipe, prompts, self.max_sequence_length, device=self.model.device,
                                   dtype=torch.float32, cache=self._bridge_text)
        return reward_latents, cond

    def score(self, latents: torch.Tensor, cond: TextConditioning, prompts: list[str], *, u: float,
              noise: torch.Tensor | None = None, n_noise: int = 1,
              ensemble: list[float] | None = None) -> torch.Tensor:
        """Raw reward ``(B,)`` float32 of clean policy latents (differentiable w.r.t. ``latents``); with
        ``ensemble`` the multi-level DiNa-LRM* score (one shared noise ``noise[0]``)."""
        with self._context():
            if self.bridge is not None:
                latents, cond = self._bridge(latents, prompts)
            x = latents.to(device=self.model.device, dtype=torch.float32)
            cond = cond.to(device=self.model.device)
            if ensemble:
                eps = None if noise is None else noise.reshape(-1, *x.shape)[0]
                return self.model.score_ensemble(x, prompt_embeds=cond, us=ensemble, noise=eps).float()
            return self.model.score_conditioning(x, cond, u=u, noise=noise, n_noise=n_noise, check=False).float()

    def normalize(self, raw: torch.Tensor, offset: float | None = None, scale: float | None = None) -> torch.Tensor:
        """``(raw + offset) / scale`` with the model's own values where not given."""
        norm = self.model.normalization
        offset = norm.offset if offset is None else offset
        scale = norm.scale if scale is None else scale
        return (raw + offset) / scale


def build_reward_scorer(cfg: Any, pipe: Any, adapter: Any, run: Any) -> RewardScorer:
    """The frozen reward of a recipe, built on the policy pipeline (before the policy LoRA is added).

    ``reward.model``: ``tiny[:SEED]`` (a tiny random reward model on the policy's own transformer), a
    tiny id of a family (``tiny-flux``...), a local folder or a hub id.
    """
    from dinalrm_align.backbones.loading import load_any_pipeline
    from dinalrm_align.reward_model.model import LatentRewardModel

    rcfg = cfg.reward
    dtype = run.weight_dtype if rcfg.dtype == "auto" else _DTYPES[rcfg.dtype]
    family = _reward_family(rcfg.model, adapter.name)
    spec = rcfg.model
    if rcfg.model == "tiny" or rcfg.model.startswith("tiny:"):
        spec = f"tiny-{adapter.name}{rcfg.model[4:]}" if adapter.name != "sd3" else rcfg.model
    bridge = None
    checkpoint = _checkpoint_config(spec) if family is None else None
    if checkpoint is not None:  # a folder or hub id: its config names the family
        family = checkpoint.backbone
    if family == adapter.name:
        rm = LatentRewardModel.from_pretrained(
            spec, transformer=pipe.transformer, torch_dtype=dtype, device=run.device,
            share_base_weights=rcfg.share_base_weights, scheduler_config=dict(pipe.scheduler.config),
        )
    else:
        if rcfg.bridge != "pixels":
            raise ValueError(f"reward.model {rcfg.model!r} is a {family} reward model; the policy is {adapter.name}: "
                             "set reward.bridge: pixels to score through decoded images (the slow path)")
        if rcfg.share_base_weights:
            raise ValueError("reward.share_base_weights needs a reward model of the policy's own family")
        base = spec if checkpoint is None else checkpoint.backbone_model_id
        reward_pipe, reward_adapter = load_any_pipeline(base, what="reward.model (its base pipeline)")
        reward_adapter.freeze_pipeline(reward_pipe, torch.float32)
        reward_pipe.to(run.device)
        rm = LatentRewardModel.from_pretrained(spec, transformer=reward_pipe.transformer, torch_dtype=dtype,
                                               device=run.device, scheduler_config=dict(reward_pipe.scheduler.config))
        bridge = ((pipe, adapter), (reward_pipe, reward_adapter))
    rm.requires_grad_(False)
    if rcfg.gradient_checkpointing:
        rm.enable_gradient_checkpointing()
    return RewardScorer(rm.eval(), autocast=rcfg.autocast, bridge=bridge,
                        max_sequence_length=cfg.sampling.max_sequence_length)


def _checkpoint_config(spec: str) -> Any:
    """The config of a reward-model folder or hub id (its family and base pipeline)."""
    from dinalrm_align.reward_model.checkpoint import find_config, resolve_model_folder
    from dinalrm_align.reward_model.config import RewardModelConfig

    return RewardModelConfig.from_file(find_config(resolve_model_folder(spec)))
