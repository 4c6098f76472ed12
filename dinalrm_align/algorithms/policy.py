"""What every policy-alignment algorithm (ReFL, GRPO) shares: building the policy and its reward,
the :class:`PolicyContext` the update maths uses, evaluation, and saving the trained policy.

Subclasses implement ``make_stream`` (their prompt stream), ``setup_algorithm`` and ``train_step``.
Nothing here branches on the backbone: everything family-specific goes through the adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from dinalrm_align.algorithms.base import Algorithm, BuildResult, EvalResult, Preflight, RunState
from dinalrm_align.backbones.conditioning import TextConditioning
from dinalrm_align.sampling.rollout import Denoiser
from dinalrm_align.trainer.config import TrainConfig

__all__ = ["PolicyAlgorithm", "PolicyContext"]


@dataclass
class PolicyContext:
    """Everything an alignment update may use (built by :meth:`PolicyAlgorithm.build`).

    Attributes:
        config: the recipe.
        run: the trainer's run state (accelerator, dtypes, sharding).
        pipeline, adapter: the policy's pipeline (frozen parts) and its backbone adapter.
        transformer: the policy transformer, unwrapped (no-grad rollouts, adapter toggling).
        model: the prepared (DDP / DeepSpeed wrapped) transformer: forwards WITH grad.
        reward: the frozen reward scorer (:class:`~dinalrm_align.algorithms.reward_scorer.RewardScorer`).
        latent_shape: ``(C, h, w)`` of the policy latents at ``sampling.resolution``.
    """

    config: TrainConfig
    run: RunState
    pipeline: Any
    adapter: Any
    transformer: torch.nn.Module
    reward: Any
    latent_shape: tuple[int, int, int]
    model: torch.nn.Module | None = None
    _negative: dict[str, TextConditioning] = field(default_factory=dict)
    _schedules: dict[int, torch.Tensor] = field(default_factory=dict)
    _text_cache: Any = None

    @property
    def accelerator(self) -> Any:
        return self.run.accelerator

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def process_index(self) -> int:
        return self.run.accelerator.process_index

    @property
    def num_processes(self) -> int:
        return self.run.accelerator.num_processes

    @property
    def reward_latent_shape(self) -> tuple[int, ...]:
        """Shape of the reward's re-noising noise per sample (the reward family's latent shape)."""
        return self.reward.latent_shape(self.latent_shape)

    def autocast(self) -> Any:
        return self.run.autocast()

    def accumulate(self) -> Any:
        return self.run.accumulate(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.run.backward(loss)

    # ------------------------------------------------------------------ text, schedule, denoiser
    def encode(self, prompts: list[str]) -> TextConditioning:
        """Policy conditioning of ``prompts`` (no grad, fp32, on the device; cached per prompt: prompts recur
        every epoch and the text encoders are frozen)."""
        from dinalrm_align.reward_model.text import PromptEmbeddingCache, encode_conditioning

        if self._text_cache is None:
            self._text_cache = PromptEmbeddingCache()
        return encode_conditioning(self.pipeline, list(prompts), self.config.sampling.max_sequence_length,
                                   device=self.device, dtype=torch.float32, cache=self._text_cache)

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[torch.nn.Module]:
        """The unwrapped policy with all its adapters disabled (the KL reference of a LoRA policy); re-enabled
        on exit."""
        transformer = self.transformer
        if not getattr(transformer, "_hf_peft_config_loaded", False):
            raise RuntimeError("the KL reference needs a LoRA policy (no adapter is loaded on the transformer)")
        transformer.disable_adapters()
        try:
            yield transformer
        finally:
            transformer.enable_adapters()

    def negative(self) -> TextConditioning:
        """Conditioning of ``sampling.negative_prompt`` (batch 1, cached)."""
        text = self.config.sampling.negative_prompt
        if text not in self._negative:
            self._negative[text] = self.encode([text])
        return self._negative[text]

    def schedule(self, num_steps: int) -> torch.Tensor:
        """The family's inference sigmas ``(T + 1,)`` at the training resolution (cached)."""
        if num_steps not in self._schedules:
            sigmas, _ = self.adapter.inference_schedule(
                self.pipeline.scheduler.config, num_steps, self.latent_shape[1:], device=self.device)
            self._schedules[num_steps] = sigmas
        return self._schedules[num_steps]

    def embedded_guidance(self) -> float | None:
        if not self.adapter.guidance_embedded(self.transformer):
            return None
        value = self.config.sampling.embedded_guidance
        return float(value if value is not None else self.adapter.default_embedded_guidance)

    def denoiser(self, transformer: Any, *, guidance_scale: float = 1.0, detach_uncond: bool = False,
                 batch: int | None = None) -> Denoiser:
        """The policy as a velocity field on ``transformer`` (the prepared model for grad, else unwrapped)."""
        cfg = guidance_scale > 1.0
        return Denoiser(
            self.adapter, transformer, guidance_scale=guidance_scale,
            negative=self.negative() if cfg else None, guidance=self.embedded_guidance(),
            detach_uncond=detach_uncond,
        )

    # ------------------------------------------------------------------ reward
    def score_reward(self, latents: torch.Tensor, cond: TextConditioning, prompts: list[str], *,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        """Raw reward ``(B,)`` of clean policy latents (differentiable when grad is enabled)."""
        rcfg = self.config.reward
        return self.reward.score(latents, cond, prompts, u=rcfg.u, noise=noise, n_noise=rcfg.n_noise,
                                 ensemble=rcfg.ensemble)

    def normalize_reward(self, raw: torch.Tensor) -> torch.Tensor:
        """``(raw + offset) / scale``: ``reward.offset`` / ``reward.scale`` if set, else the model's own."""
        return self.reward.normalize(raw, self.config.reward.offset, self.config.reward.scale)


class PolicyAlgorithm(Algorithm):
    """Base of ReFL and GRPO (see the module docstring)."""

    recipe_class: ClassVar[type] = TrainConfig
    progress_metric: ClassVar[str] = "reward_raw_mean"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.ctx: PolicyContext | None = None
        self.evaluator: Any = None

    # ------------------------------------------------------------------ preflight
    def validate(self, recipe: TrainConfig, world_size: int) -> None:  # noqa: B027 - optional hook
        """Algorithm-specific checks of the recipe (cheap)."""

    def preflight(self, recipe: TrainConfig, world_size: int) -> Preflight:
        from dinalrm_align.algorithms.reward_scorer import check_reward_spec
        from dinalrm_align.trainer.data import load_prompts, split_eval
        from dinalrm_align.trainer.evaluation import check_proxy_rewards

        d = recipe.data
        prompts = load_prompts(d.prompts, d.format, d.column, d.split)
        source = load_prompts(d.eval_prompts, d.format, d.column, d.eval_split or d.split) if d.eval_prompts else None
        train_prompts, eval_prompts = split_eval(prompts, d.num_eval_prompts, recipe.seed, source)
        if not train_prompts:
            raise ValueError(f"no training prompts left in {d.prompts!r} after the eval split")
        self.validate(recipe, world_size)
        self._preflight_backbone(recipe)  # recipe-only checks first, then the files they name
        check_reward_spec(recipe)
        check_proxy_rewards(recipe.eval.proxy_rewards)
        accumulation = recipe.train.accumulation_for(world_size)
        digest = hashlib.sha256("\n".join(train_prompts + ["\x00"] + eval_prompts).encode()).hexdigest()[:16]
        return Preflight(
            world_size, accumulation,
            f"{len(train_prompts)} training prompts, {len(eval_prompts)} eval prompts",
            digest, {"train_prompts": train_prompts, "eval_prompts": eval_prompts},
        )

    def _preflight_backbone(self, recipe: TrainConfig) -> None:
        """Checks that need the policy's family, when it is known before loading (tiny ids, ``model.backbone``,
        a local folder, a known hub id)."""
        from dinalrm_align.backbones.loading import family_hint
        from dinalrm_align.backbones.registry import get_adapter

        name = family_hint(recipe.model.pretrained, recipe.model.backbone)
        if name is None:
            return
        adapter = get_adapter(name)
        self.check_guidance(recipe, adapter, adapter.guidance_distilled_hint(recipe.model.pretrained))
        multiple = adapter.resolution_multiple_hint(recipe.model.pretrained)
        side = recipe.sampling.resolution
        if multiple and side % multiple:
            raise ValueError(f"sampling.resolution {side} does not fit the {adapter.name} policy: it must be a "
                             f"multiple of {multiple} (VAE factor x patch size)")

    def check_sharding(self, recipe: TrainConfig, sharding: str) -> None:
        if recipe.reward.share_base_weights and sharding in ("zero3", "fsdp"):
            raise ValueError(
                f"reward.share_base_weights: true cannot be used with {sharding} (the shared blocks would be "
                "partitioned under the reward model); set it to false, or use DDP / ZeRO-2"
            )

    # ------------------------------------------------------------------ build
    def make_stream(self, prompts: list[str], run: RunState) -> Any:
        """The prompt stream (default: distinct ``train.batch_size`` prompts per process per batch)."""
        from dinalrm_align.trainer.data import PromptSampler

        cfg = run.config
        return PromptSampler(prompts, cfg.train.batch_size, num_processes=run.accelerator.num_processes,
                             rank=run.accelerator.process_index, seed=cfg.seed, shuffle=cfg.data.shuffle)

    def build(self, run: RunState) -> BuildResult:
        from dinalrm_align.algorithms.reward_scorer import build_reward_scorer
        from dinalrm_align.trainer.evaluation import Evaluator, load_proxy_rewards
        from dinalrm_align.trainer.policy import load_pipeline, make_trainable

        cfg: TrainConfig = run.config  # type: ignore[assignment]
        pipe, adapter = load_pipeline(cfg.model, run.weight_dtype)
        side = cfg.sampling.resolution
        latent_shape = adapter.latent_shape(pipe, side, side)
        self.check_guidance(cfg, adapter, adapter.guidance_embedded(pipe.transformer))
        pipe.to(run.device)
        reward = build_reward_scorer(cfg, pipe, adapter, run)  # before the policy LoRA exists
        params = make_trainable(pipe.transformer, cfg.model, adapter, run.weight_dtype)
        self.ctx = PolicyContext(cfg, run, pipe, adapter, pipe.transformer, reward, latent_shape)
        self.evaluator = Evaluator(run.preflight.info["eval_prompts"], run.run_dir, cfg.eval,
                                   load_proxy_rewards(cfg.eval.proxy_rewards))
        stream = self.make_stream(run.preflight.info["train_prompts"], run)
        return BuildResult(pipe.transformer, params, stream)

    def uses_sampling_cfg(self, recipe: TrainConfig) -> bool:
        """Whether training rollouts / updates use ``sampling.guidance_scale`` (CFG)."""
        return recipe.sampling.guidance_scale > 1.0

    def check_guidance(self, cfg: TrainConfig, adapter: Any, distilled: bool | None) -> None:
        """CFG on a guidance-distilled model is refused (its guidance is an input, not a second branch).
        ``distilled``: whether the policy is guidance-distilled (None: unknown yet)."""
        if not distilled:
            return
        used = [("eval.guidance_scale", cfg.eval.guidance_scale)]
        if self.uses_sampling_cfg(cfg):
            used.append(("sampling.guidance_scale", cfg.sampling.guidance_scale))
        for key, value in used:
            if value > 1.0:
                raise ValueError(
                    f"{key}={value}: the {adapter.name} policy is guidance-distilled (its guidance is an input, "
                    "sampling.embedded_guidance); classifier-free guidance is not used with it: set it to 1"
                )

    def setup(self, run: RunState, model: torch.nn.Module) -> None:
        assert self.ctx is not None
        self.ctx.model = model
        self.ctx.transformer = run.accelerator.unwrap_model(model)
        self.setup_algorithm(self.ctx)

    def setup_algorithm(self, ctx: PolicyContext) -> None:  # noqa: B027 - optional hook
        """Algorithm-specific setup after ``prepare`` (schedules, generators, extra rewards)."""

    # ------------------------------------------------------------------ eval, save
    def evaluate(self, step: int) -> EvalResult | None:
        assert self.ctx is not None
        transformer = self.ctx.transformer
        was_training = transformer.training
        transformer.eval()
        try:
            return self.evaluator.evaluate(self.ctx, step)
        finally:
            transformer.train(was_training)

    def save_final(self, out_dir: Path, trainable_state: dict[str, torch.Tensor]) -> str:
        from dinalrm_align.trainer.policy import save_full, save_lora

        assert self.ctx is not None
        cfg, adapter = self.ctx.config, self.ctx.adapter
        if cfg.model.finetune == "lora":
            save_lora(self.ctx.transformer, adapter.pipeline_class(), out_dir, cfg.model.lora.adapter_name,
                      state_dict=trainable_state)
            return f"diffusers LoRA: {adapter.pipeline_class_name}.load_lora_weights"
        save_full(self.ctx.transformer, out_dir, state_dict=trainable_state)
        return f"{adapter.transformer_class_name} folder"

    def model_card(self, summary: dict[str, Any]) -> str | None:
        from dinalrm_align.trainer.model_card import policy_card

        assert self.ctx is not None
        return policy_card(self.ctx.config, self.ctx.adapter, self.name, summary)
