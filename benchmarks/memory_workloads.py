"""What the memory model runs: backbones, rewards, and the ReFL / GRPO updates as functions of them.

A :class:`Backbone` bundles the builders of one policy family (transformer, policy LoRA, inputs,
velocity call, VAE, text encoders, latent reward); ``benchmarks.memory_backbones`` has SD3.5-Medium,
FLUX.1-dev and Z-Image-Turbo. A backbone row of the benchmark is a function of a ``Backbone``. A
:class:`Reward` says how to build and call one reward on predicted clean latents: DiNa-LRM with its own
copy of the kept blocks, with the reward LoRA merged, or with ``share_base_weights`` (the kept blocks'
frozen base tensors are the policy's), and VAE decode + CLIP-H / + Qwen2-VL-7B.

:class:`Models` builds everything once on the meta device and then either converts it to fake
tensors (``kind="fake"``: real scale, no memory) or materialises it with random values on the CPU
(``kind="real"``: the validation). The update functions are the same for both:

* :func:`refl_update` -- graded policy forward with grad (no CFG), ``x0_hat = z - sigma v``,
  reward on ``x0_hat``, backward into the policy LoRA, AdamW step;
* :func:`grpo_update` -- optional no-grad reference forward (KL), policy forward with grad at one SDE
  step (optionally with CFG, unconditional branch detached), Flow-GRPO log-prob, PPO-clip (+ KL)
  loss, backward, AdamW step;
* :func:`reward_inference` -- the reward on final latents without grad (GRPO scoring);
* :func:`rollout_step` -- one no-grad CFG policy step (the ReFL / GRPO sampling phase).

Each takes ``between_calls``, called between two forwards of the same model in one update (GRPO's
reference and graded forwards), where the tracker resets its per-module bookkeeping.

Mixed precision is autocast to ``Setting.dtype`` with the CUDA op policy (see ``memory_model``);
frozen weights in ``Setting.dtype``, the policy LoRA in fp32 (as ``dinalrm_align.trainer`` sets up).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchmarks import common as C
from benchmarks import memory_model as M

Modules = dict[str, nn.Module]


@dataclass(frozen=True)
class Setting:
    """One update: image size, text length, batch, weight dtype and the step's constants."""

    resolution: int = 1024
    t5_length: int = 128
    batch: int = 1
    dtype: torch.dtype = torch.bfloat16
    sigma: float = 0.25  # graded step / SDE step noise level (no effect on memory)
    sigma_next: float = 0.2
    noise_level: float = 0.7  # Flow-GRPO SDE
    guidance: float = 4.5
    kl_beta: float = 0.004  # GRPO recipe; > 0 adds the no-grad reference forward
    clip_range: float = 1e-4


@dataclass
class Backbone:
    """Builders and calls of one policy family (all models built on the meta device)."""

    name: str
    build_transformer: Callable[[torch.dtype], nn.Module]
    add_lora: Callable[[nn.Module], list[nn.Parameter]]
    #: ``(setting, device) -> {"latents": (B, C, h, w) fp32, "cond": {...}, "negative": {...}}``
    inputs: Callable[[Setting, str], dict[str, Any]]
    #: ``(transformer, latents, sigma, cond) -> velocity`` (same shape as latents)
    velocity: Callable[[nn.Module, torch.Tensor, float, dict[str, torch.Tensor]], torch.Tensor]
    build_vae: Callable[[torch.dtype], nn.Module]
    build_text_encoders: Callable[[torch.dtype], Modules]
    #: ``(base transformer, dtype, merged LoRA, share base weights) -> latent reward model``; None: no latent reward
    build_latent_reward: Callable[[nn.Module, torch.dtype, bool, bool], nn.Module] | None = None
    #: ``(reward model, x0 (B, C, h, w) fp32, inputs) -> (B,) reward``
    latent_score: Callable[[nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor] | None = None
    #: text tokens of the VLM scorer's prompt (the chat template and instruction included)
    vlm_text_tokens: int = C.VLM_TEXT_TOKENS
    #: the resident text encoders, in words (the reports' "+ encoders" column)
    text_encoders_label: str = "CLIP-L, CLIP-G and T5-XXL"
    #: the benchmark preset (``extra["preset"]``: the pixel scorers' sizes) and anything else a builder needs
    extra: dict[str, Any] = field(default_factory=dict)


def cast_all(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters and floating buffers to ``dtype`` (what ``from_pretrained(torch_dtype=...)`` gives)."""
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "modules that should be kept in float32: []"
    try:
        return module.to(dtype)
    finally:
        quiet.setLevel(level)


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


@dataclass
class Reward:
    """One reward on predicted clean latents."""

    key: str
    label: str
    #: ``(backbone, base transformer, VAE, dtype) -> {name: module}``, all on the meta device
    build: Callable[[Backbone, nn.Module, nn.Module, torch.dtype], Modules]
    #: ``(modules, backbone, x0 fp32 latents, inputs) -> (B,) reward``
    score: Callable[[Modules, Backbone, torch.Tensor, dict[str, Any]], torch.Tensor]
    #: gradient checkpointing of the reward's own backbone on/off
    checkpointing: Callable[[Modules, bool], None]


def _hf_checkpointing(model: nn.Module, on: bool) -> None:
    """transformers checkpoints only in train mode; these models have no dropout, so train() is harmless."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    if on:
        enable()
        model.train()
    else:
        disable()
        model.eval()


def _vae_checkpointing(vae: nn.Module, on: bool) -> None:
    vae.enable_gradient_checkpointing() if on else vae.disable_gradient_checkpointing()


def latent_reward(merged: bool, shared: bool = False) -> Reward:
    """DiNa-LRM on the backbone: its own bf16 copy of the kept blocks (reward LoRA unmerged or ``merged``), or
    ``shared``: the kept blocks' frozen base tensors are the policy's (``share_base_weights``)."""
    if merged and shared:
        raise ValueError("a merged reward LoRA cannot share the policy's base weights")

    def build(bb: Backbone, base: nn.Module, vae: nn.Module, dtype: torch.dtype) -> Modules:
        if bb.build_latent_reward is None:
            raise ValueError(f"{bb.name} has no latent reward model")
        return {"reward_model": bb.build_latent_reward(base, dtype, merged, shared)}

    def score(mods: Modules, bb: Backbone, x0: torch.Tensor, x: dict[str, Any]) -> torch.Tensor:
        assert bb.latent_score is not None
        return bb.latent_score(mods["reward_model"], x0, x)

    def ckpt(mods: Modules, on: bool) -> None:
        backbone = mods["reward_model"].backbone
        if hasattr(backbone, "enable_gradient_checkpointing"):  # a truncated diffusers transformer
            backbone.enable_gradient_checkpointing() if on else backbone.disable_gradient_checkpointing()
        else:
            backbone.gradient_checkpointing = on

    key = "dina_merged" if merged else ("dina_shared" if shared else "dina")
    label = "DiNa-LRM" + (", LoRA merged" if merged else (", base shared with the policy" if shared else ""))
    return Reward(key, label, build, score, ckpt)


def _pixel_reward(key: str, label: str, build_scorer: Callable[[C.Preset], nn.Module], vlm: bool) -> Reward:
    def build(bb: Backbone, base: nn.Module, vae: nn.Module, dtype: torch.dtype) -> Modules:
        return {"vae": vae, "scorer": cast_all(build_scorer(bb.extra["preset"]), dtype)}

    def score(mods: Modules, bb: Backbone, x0: torch.Tensor, x: dict[str, Any]) -> torch.Tensor:
        images = C.vae_decode(mods["vae"], x0)
        if vlm:
            return C.vlm_score(mods["scorer"], images, bb.vlm_text_tokens)
        ids = torch.zeros(x0.shape[0], 77, dtype=torch.long, device=x0.device)
        return C.clip_score(mods["scorer"], images, ids)

    def ckpt(mods: Modules, on: bool) -> None:
        _vae_checkpointing(mods["vae"], on)
        _hf_checkpointing(mods["scorer"], on)

    return Reward(key, label, build, score, ckpt)


def rewards() -> dict[str, Reward]:
    """DiNa-LRM (LoRA unmerged / merged / base shared), VAE decode + CLIP-H/14 (224 px), VAE decode + Qwen2-VL-7B."""
    return {
        "dina": latent_reward(False),
        "dina_merged": latent_reward(True),
        "dina_shared": latent_reward(False, shared=True),
        "clip": _pixel_reward("clip", "VAE decode + CLIP-H/14", lambda p: C.build_clip(p), vlm=False),
        "vlm": _pixel_reward("vlm", "VAE decode + Qwen2-VL-7B", lambda p: C.build_vlm(p), vlm=True),
    }


# --------------------------------------------------------------------------------------------
# Models: built once, fake or real
# --------------------------------------------------------------------------------------------


class Models:
    """Policy (+ LoRA + AdamW with its state), the requested rewards, VAE and text encoders.

    ``kind="fake"``: fake tensors on the CPU (real scale, nothing allocated); ``kind="real"``:
    random values on the CPU (validation). Text encoders are only ever sized (meta).
    """

    def __init__(self, backbone: Backbone, reward_keys: list[str], setting: Setting, kind: str = "fake") -> None:
        if kind not in ("fake", "real"):
            raise ValueError(f"kind must be 'fake' or 'real', got {kind!r}")
        self.backbone, self.setting, self.kind = backbone, setting, kind
        dtype = setting.dtype
        all_rewards = rewards()
        unknown = [k for k in reward_keys if k not in all_rewards]
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; choose from {sorted(all_rewards)}")
        self.policy = backbone.build_transformer(dtype)
        self.vae = backbone.build_vae(dtype)
        self.rewards = {k: all_rewards[k] for k in reward_keys}
        self.reward_modules = {k: r.build(backbone, self.policy, self.vae, dtype) for k, r in self.rewards.items()}
        backbone.add_lora(self.policy)  # after the reward models copied the frozen base blocks
        self.text_encoders = backbone.build_text_encoders(dtype)
        self.mode = M.new_fake_mode() if kind == "fake" else None
        memo: dict[int, Any] = {}
        modules = [self.policy, self.vae, *[m for mods in self.reward_modules.values() for m in mods.values()]]
        for module in {id(m): m for m in modules}.values():
            if self.mode is not None:
                M.to_fake(module, self.mode, memo=memo)
            else:
                _materialise(module, memo)
        self.lora = [p for p in self.policy.parameters() if p.requires_grad]
        with self.context():
            self.optimizer = torch.optim.AdamW(self.lora, lr=1e-6, foreach=True)
            for p in self.lora:  # steady state: the AdamW moments exist before the measured step
                p.grad = torch.zeros_like(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.inputs = backbone.inputs(setting, "cpu")

    def context(self) -> contextlib.AbstractContextManager:
        """The fake mode (fake models) or nothing (real models)."""
        return self.mode if self.mode is not None else contextlib.nullcontext()

    def input_tensors(self) -> list[torch.Tensor]:
        x = self.inputs
        return [x["latents"], x["noise"], *x["cond"].values(), *x["negative"].values()]

    def vae_decoder(self) -> nn.Module:
        return self.vae.decoder


def _materialise(module: nn.Module, memo: dict[int, Any]) -> None:
    """Meta -> CPU with small random values (the values do not matter, they must be finite)."""
    with torch.no_grad():
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for name, t in list(store.items()):
                    if t is None:
                        continue
                    if id(t) not in memo:
                        real = torch.randn(t.shape, dtype=torch.float32).mul_(0.02).to(t.dtype)
                        memo[id(t)] = nn.Parameter(real, requires_grad=t.requires_grad) if isinstance(
                            t, nn.Parameter) else real
                    store[name] = memo[id(t)]


# --------------------------------------------------------------------------------------------
# Updates
# --------------------------------------------------------------------------------------------


def guided_velocity(
    models: Models, z: torch.Tensor, sigma: float, cfg: bool, detach_uncond: bool = True
) -> torch.Tensor:
    """Policy velocity; with ``cfg`` one batched [uncond, cond] forward, ``v_u + g (v_c - v_u)``."""
    bb, x = models.backbone, models.inputs
    if not cfg:
        return bb.velocity(models.policy, z, sigma, x["cond"])
    cond = {k: torch.cat([x["negative"][k], v]) for k, v in x["cond"].items()}
    v_u, v_c = bb.velocity(models.policy, torch.cat([z, z]), sigma, cond).chunk(2)
    if detach_uncond:
        v_u = v_u.detach()
    return v_u + models.setting.guidance * (v_c - v_u)


def refl_update(models: Models, reward_key: str, between_calls: Callable[[], None] | None = None) -> None:
    """Graded step without CFG at ``sigma``, reward on ``x0_hat``, backward, AdamW step."""
    s = models.setting
    reward = models.rewards[reward_key]
    z = models.inputs["latents"]
    with M.autocast(s.dtype):
        v = guided_velocity(models, z, s.sigma, cfg=False)
        x0_hat = z.float() - s.sigma * v.float()
        raw = reward.score(models.reward_modules[reward_key], models.backbone, x0_hat, models.inputs)
        loss = -(raw.float() / 10.0).mean()  # ReFL: -mean(normalised reward)
        loss.backward()
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)


def grpo_update(models: Models, cfg: bool, between_calls: Callable[[], None] | None = None) -> None:
    """One trained SDE step: (reference forward,) policy fwd+bwd, Flow-GRPO log-prob, PPO-clip + KL."""
    from dinalrm_align.algorithms.losses import gaussian_mean_kl, ppo_clip_loss
    from dinalrm_align.sampling.steps import sde_step_with_logprob

    s = models.setting
    x_t = models.inputs["latents"]
    x_next = models.inputs["noise"]  # the stored next latent of the rollout (any fp32 tensor of that shape)
    b = x_t.shape[0]
    old_log_prob = torch.zeros(b)
    advantages = torch.ones(b)
    ref_mean = None
    if s.kl_beta > 0:
        models.policy.disable_adapters()
        try:
            with torch.no_grad(), M.autocast(s.dtype):
                v_ref = guided_velocity(models, x_t, s.sigma, cfg)
                ref_mean = sde_step_with_logprob(x_t, v_ref, s.sigma, s.sigma_next, s.noise_level, prev_sample=x_next).mean
        finally:
            models.policy.enable_adapters()
        del v_ref
        if between_calls is not None:
            between_calls()
    with M.autocast(s.dtype):
        v = guided_velocity(models, x_t, s.sigma, cfg, detach_uncond=True)
        out = sde_step_with_logprob(x_t, v, s.sigma, s.sigma_next, s.noise_level, prev_sample=x_next)
        loss, _ = ppo_clip_loss(out.log_prob, old_log_prob, advantages, s.clip_range)
        if ref_mean is not None:
            loss = loss + s.kl_beta * gaussian_mean_kl(out.mean, ref_mean, out.std).mean()
        loss.backward()
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)


def reward_inference(models: Models, reward_key: str, between_calls: Callable[[], None] | None = None) -> None:
    """The reward on final latents without grad (GRPO scoring)."""
    reward = models.rewards[reward_key]
    with torch.no_grad(), M.autocast(models.setting.dtype):
        reward.score(models.reward_modules[reward_key], models.backbone, models.inputs["latents"], models.inputs)


def rollout_step(models: Models, cfg: bool = True, between_calls: Callable[[], None] | None = None) -> None:
    """One no-grad sampling step of the policy (CFG: batch 2)."""
    with torch.no_grad(), M.autocast(models.setting.dtype):
        v = guided_velocity(models, models.inputs["latents"], models.setting.sigma, cfg)
        _ = models.inputs["latents"] + (models.setting.sigma_next - models.setting.sigma) * v.float()

