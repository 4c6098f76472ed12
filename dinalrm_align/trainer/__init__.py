"""The one trainer and its infrastructure, shared by every algorithm (ReFL, GRPO, reward-model training).

Submodules have one job each and are imported on demand (this package imports nothing heavy):

- ``sections``: recipe sections every algorithm shares (optim, train, ema, checkpoint, tracking)
- ``config``: the alignment recipe (:class:`TrainConfig`: model, reward, sampling, data, eval)
- ``recipe``: loading recipes with OmegaConf (YAML + ``key.sub=value`` overrides), fingerprints
- ``accelerator``: Accelerator construction (mixed precision, DeepSpeed, FSDP, gloo on CPU)
- ``checkpointing``: atomic ``accelerator.save_state`` checkpoints, rotation, ``latest``, fallback, fingerprints
- ``state``: trainer state and the save / load hooks (trainable weights, per-process algorithm state)
- ``ema``: diffusers' ``EMAModel`` with a swap-in context
- ``guard``: divergence detection (non-finite loss / gradients / rewards)
- ``metrics``: device-side metric buffer (host transfers only at log steps)
- ``tracking``: wandb / tensorboard / none trackers, ``metrics.jsonl``, captioned grids and tables
- ``data``, ``grouping``: prompt sources and streams (plain, GRPO's k-repeat)
- ``policy``: load a pipeline (any backbone), add the policy LoRA, save it in diffusers' format
- ``evaluation``, ``grid``: deterministic ODE evaluation, hacking monitor, captioned image grids
- ``model_card``: model cards and the Hub upload
- ``loop``: the :class:`~dinalrm_align.trainer.loop.Trainer`
- ``cli``: ``dinalrm-align train RECIPE.yaml``
"""
