"""Reward-model training, evaluation and calibration for latent reward models (issue 6).

Modules (import what you need; nothing heavy is imported here): ``data`` (pair shards, bucket
index, sampler), ``preprocess`` (images -> shards), ``losses`` (pure), ``pair`` (shared-noise pair
forward), ``config`` (typed recipe), ``train`` (the trainer), ``evaluate`` (accuracy protocol,
plots), ``calibration`` (pure), ``report`` (eval-rm), ``cli`` (train-rm / eval-rm / preprocess).
"""
