"""Reward-model training as an algorithm of the one trainer (``algorithm: reward_model``).

Per micro-step: a single-bucket batch of pairs; prompts encoded with the frozen text stack of the
backbone's pipeline (cached); one ``u`` per pair (uniform or logit-normal) mapped to the nearest table
sigma; ONE noise draw per pair shared by chosen and rejected; both scored in one pass of ``2B`` rows;
preference loss; backward. The trainer does the rest (clipping, AdamW, LR schedule, EMA, checkpoints,
evaluation, tracking). Evaluation runs on every process (pairs split over processes, scores gathered),
so it also works when the model is sharded (ZeRO-3). Checkpoints also hold ``model/``: the EMA weights in
the released layout, loadable with ``LatentRewardModel.from_pretrained``; the final model is ``run_dir/final``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import torch

from dinalrm_align.algorithms.base import Algorithm, BuildResult, EvalResult, Preflight, RunState
from dinalrm_align.rm_training.config import RMAlgorithmConfig, RMTrainConfig
from dinalrm_align.trainer.sections import AlgorithmConfig

__all__ = ["RewardModelTraining"]


def _data(cfg: RMTrainConfig) -> tuple[Any, Any, Any, Any]:
    """``(train_dataset, train_index, eval_dataset | None, eval_index | None)`` per the ``data`` section."""
    from dinalrm_align.rm_training.data import PairDataset, build_index, min_votes_filter

    index = build_index(cfg.data.train)
    if cfg.data.min_votes is not None:
        index = index.filter(min_votes_filter(cfg.data.min_votes))
    if cfg.data.eval:
        train_index, eval_index = index, build_index(cfg.data.eval)
    elif cfg.data.num_eval > 0:
        train_index, eval_index = index.split(cfg.data.num_eval, seed=cfg.seed)
    else:
        train_index, eval_index = index, None
    if len(train_index) == 0:
        raise ValueError(f"no training pairs left in {cfg.data.train} (after filters / the eval split)")
    eval_ds = PairDataset(eval_index) if eval_index is not None and len(eval_index) else None
    return PairDataset(train_index), train_index, eval_ds, eval_index


def _check_preset(preset: str, family: str | None, spec: str) -> None:
    if preset == "sd35m" and family not in (None, "sd3"):
        raise ValueError(f"model.preset: sd35m is SD3.5-Medium's architecture; {spec} is a {family} pipeline: use "
                         "model.preset: default (the family's own architecture)")


class RewardModelTraining(Algorithm):
    """Train a latent reward model on preference pairs (see the module docstring)."""

    name: ClassVar[str] = "reward_model"
    config_class: ClassVar[type[AlgorithmConfig]] = RMAlgorithmConfig
    recipe_class: ClassVar[type] = RMTrainConfig
    progress_metric: ClassVar[str] = "pair_accuracy"
    #: Checkpoints also hold ``model/`` (the EMA weights in the released layout).
    exports_checkpoints: ClassVar[bool] = True

    def __init__(self, config: RMAlgorithmConfig) -> None:
        super().__init__(config)
        self.generator = torch.Generator()
        self.rm: Any = None

    # ------------------------------------------------------------------ preflight
    def preflight(self, recipe: RMTrainConfig, world_size: int) -> Preflight:
        from dinalrm_align.backbones.loading import family_hint, looks_local
        from dinalrm_align.tiny_pipelines import parse_tiny_id

        spec = recipe.model.pipeline
        if parse_tiny_id(spec) is None and looks_local(spec) and not Path(spec).expanduser().exists():
            raise FileNotFoundError(f"pipeline folder not found: {spec} (model.pipeline)")
        _check_preset(recipe.model.preset, family_hint(spec, recipe.model.backbone), spec)
        if recipe.model.init_from and looks_local(recipe.model.init_from) and not Path(recipe.model.init_from).exists():
            raise FileNotFoundError(f"reward model to fine-tune not found: {recipe.model.init_from} (model.init_from)")
        if recipe.data.synthetic_pairs:
            from dinalrm_align.rm_training.synthetic import ensure_synthetic_pairs

            n = recipe.data.synthetic_pairs
            folders = {recipe.data.train: n, **({recipe.data.eval: max(1, n // 4)} if recipe.data.eval else {})}
            ensure_synthetic_pairs(folders, spec, backbone=recipe.model.backbone, seed=recipe.seed)
        train_ds, train_index, eval_ds, _ = _data(recipe)
        accumulation = recipe.train.accumulation_for(world_size)
        from dinalrm_align.rm_training.data import BucketBatchSampler

        BucketBatchSampler(train_index, recipe.train.batch_size, num_processes=world_size)  # a full batch exists
        signature = ([p.name for p in train_index.shards], train_index.shard_id.tolist(), train_index.row.tolist())
        digest = hashlib.sha256(repr(signature).encode()).hexdigest()[:16]
        summary = (f"{len(train_ds)} training pairs in {len(train_index.buckets())} bucket(s), "
                   f"{0 if eval_ds is None else len(eval_ds)} eval pairs")
        return Preflight(world_size, accumulation, summary, digest, {"data": (train_ds, train_index, eval_ds)})

    # ------------------------------------------------------------------ build
    def _reward_model(self, cfg: RMTrainConfig, pipe: Any, adapter: Any) -> Any:
        from dinalrm_align.reward_model.config import RewardModelConfig
        from dinalrm_align.reward_model.model import LatentRewardModel
        from dinalrm_align.tiny_pipelines import tiny_reward_model_config

        scheduler_config = dict(pipe.scheduler.config)
        if cfg.model.init_from:
            return LatentRewardModel.from_pretrained(cfg.model.init_from, transformer=pipe.transformer,
                                                     scheduler_config=scheduler_config, torch_dtype=torch.float32)
        _check_preset(cfg.model.preset, adapter.name, cfg.model.pipeline)
        if cfg.model.preset == "tiny":
            config = RewardModelConfig.from_dict(tiny_reward_model_config(adapter.name, **cfg.model.architecture))
        else:
            config = RewardModelConfig.for_backbone(adapter.name, **cfg.model.architecture)
        rm = LatentRewardModel.from_config(config, transformer=pipe.transformer, scheduler_config=scheduler_config)
        if cfg.model.zero_init_noise > 0:
            with torch.no_grad():
                for name, p in rm.named_parameters():
                    trainable = name.startswith("reward_head.") or "lora_B" in name
                    if trainable and p.dim() > 0 and torch.count_nonzero(p) == 0:
                        p.normal_(0.0, cfg.model.zero_init_noise)
        return rm

    def build(self, run: RunState) -> BuildResult:
        from dinalrm_align.backbones.loading import load_any_pipeline
        from dinalrm_align.reward_model.text import PromptEmbeddingCache
        from dinalrm_align.rm_training.data import BucketBatchSampler
        from dinalrm_align.rm_training.pair import PairScorer
        from dinalrm_align.trainer.recipe import config_to_dict

        cfg: RMTrainConfig = run.config  # type: ignore[assignment]
        self.recipe = cfg
        acc = run.accelerator
        kwargs = {k: v for k, v in (("revision", cfg.model.revision), ("variant", cfg.model.variant)) if v}
        pipe, adapter = load_any_pipeline(cfg.model.pipeline, backbone=cfg.model.backbone, torch_dtype=torch.float32,
                                          what="model.pipeline", **kwargs)
        adapter.freeze_pipeline(pipe, torch.float32)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module) and name.startswith("text_encoder"):
                module.to(acc.device)
        self.pipeline = pipe
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            rm = self._reward_model(cfg, pipe, adapter)
        rm.config.extra["rm_training"] = config_to_dict(cfg)
        params = rm.set_trainable(lora=cfg.model.train_lora, head=cfg.model.train_head)
        if not params:
            raise ValueError("the reward model has no trainable parameters (no LoRA and the head frozen?)")
        if run.weight_dtype != torch.float32:  # frozen weights in the mixed-precision dtype, trainable fp32
            for p in rm.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(run.weight_dtype)
        if cfg.model.gradient_checkpointing:
            rm.enable_gradient_checkpointing()
        rm.to(acc.device)
        self.rm = rm
        self.train_ds, train_index, self.eval_ds = run.preflight.info["data"]
        self.generator.manual_seed(cfg.seed * 1009 + acc.process_index)
        self.text_cache = PromptEmbeddingCache(cfg.data.text_cache) if cfg.data.text_cache else None
        sampler = BucketBatchSampler(train_index, cfg.train.batch_size, num_processes=acc.num_processes,
                                     rank=acc.process_index, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.run = run
        return BuildResult(PairScorer(rm), params, sampler)

    def setup(self, run: RunState, model: torch.nn.Module) -> None:
        self.model = model
        self.rm.train()

    def encode(self, prompts: list[str]) -> Any:
        """Frozen text stack (no grad, cached) -> fp32 conditioning on the accelerator device."""
        from dinalrm_align.reward_model.text import encode_conditioning

        return encode_conditioning(self.pipeline, prompts, self.recipe.model.max_sequence_length,
                                   device=self.run.device, dtype=torch.float32, cache=self.text_cache)

    # ------------------------------------------------------------------ the step
    def train_step(self, positions: list[int]) -> dict[str, Any]:
        from dinalrm_align.rm_training.losses import preference_loss, sample_u

        cfg, run, rm = self.recipe, self.run, self.rm
        batch = self.train_ds.batch(positions)
        cond = self.encode(batch.prompts)
        b = len(batch)
        loss_cfg = cfg.loss
        u = sample_u(b, loss_cfg.u_sampler, generator=self.generator, logit_mean=loss_cfg.logit_mean,
                     logit_std=loss_cfg.logit_std, low=loss_cfg.u_min, high=loss_cfg.u_max)
        sigma, _ = rm.sigma_for(u)
        noise = torch.randn(batch.chosen.shape, generator=self.generator)
        device = run.device
        with run.accumulate(self.model), run.autocast():
            r_pos, r_neg = self.model(batch.chosen.to(device), batch.rejected.to(device), sigma.to(device),
                                      noise.to(device), cond)
            loss = preference_loss(loss_cfg.name, r_pos, r_neg, sigma.to(device), variance_scale=loss_cfg.variance_scale,
                                   variance_floor=loss_cfg.variance_floor, constant_variance=loss_cfg.constant_variance)
            run.backward(loss)
        margin = (r_pos - r_neg).detach().float()
        return {"loss": loss.detach(), "pair_accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                "sigma": sigma.mean()}

    # ------------------------------------------------------------------ eval and outputs
    def evaluate(self, step: int) -> EvalResult | None:
        from dinalrm_align.rm_training.evaluate import EvalSettings, score_pairs

        cfg = self.recipe
        if self.eval_ds is None:
            return None
        settings = EvalSettings(us=tuple(cfg.eval.us), ensemble=tuple(cfg.eval.ensemble) if cfg.eval.ensemble else None,
                                seed=cfg.eval.seed, n_noise=cfg.eval.n_noise, batch_size=cfg.eval.batch_size)
        n = len(self.eval_ds) if cfg.eval.num_pairs is None else min(cfg.eval.num_pairs, len(self.eval_ds))
        was_training = self.rm.training
        self.rm.eval()
        try:
            with torch.no_grad():
                scores = score_pairs(self.rm, self.eval_ds, self.encode, settings, positions=list(range(n)),
                                     accelerator=self.run.accelerator)
        finally:
            self.rm.train(was_training)
        metrics = {f"eval/accuracy_u{k}": v for k, v in scores.accuracy().items()}
        metrics["eval/num_pairs"] = float(n)
        return EvalResult(metrics, headline=[k for k in metrics if k.startswith("eval/accuracy")])

    def save_final(self, out_dir: Path, trainable_state: dict[str, torch.Tensor]) -> str:
        from dinalrm_align.reward_model.checkpoint import save_model

        prefix = "reward_model."
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in trainable_state.items()}
        save_model(self.rm, out_dir, overwrite=True, state_override=state)
        return "reward model, released layout (LatentRewardModel.from_pretrained)"

    def model_card(self, summary: dict[str, Any]) -> str | None:
        from dinalrm_align.trainer.model_card import reward_model_card

        return reward_model_card(self.recipe, self.rm, summary)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
