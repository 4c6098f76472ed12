"""Shared training infrastructure used by every alignment algorithm (and reward-model training).

Submodules have one job each and are imported on demand (this package imports nothing heavy):

- ``config``: typed dataclass configs from YAML + ``--set a.b=c`` overrides (``load_dataclass``)
- ``accelerator``: Accelerator construction (mixed precision, DeepSpeed, gloo on CPU)
- ``checkpointing``: atomic checkpoints, rotation, ``latest``, RNG and data-position state
- ``tracking``: wandb / tensorboard / none trackers, scalar and image logging
- ``ema``: EMA of trainable weights with a swap-in context
- ``data``: prompt sources, eval split, resumable distributed prompt sampler
- ``policy``: load the SD3 pipeline, add the policy LoRA, save it in diffusers format
- ``evaluation``: deterministic ODE evaluation on held-out prompts
- ``loop``: the :class:`~dinalrm_align.trainer.loop.Trainer`
- ``cli``: ``dinalrm-align train RECIPE.yaml``
"""
