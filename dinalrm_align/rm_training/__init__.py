"""Reward-model training, evaluation and calibration for latent reward models (any backbone).

Modules (import what you need; nothing heavy is imported here): ``data`` (pair shards, bucket index,
sampler), ``preprocess`` (+ ``buckets``, ``pair_sources``, ``image_io``, ``image_workers``,
``latent_encoding``: images -> shards), ``losses`` (pure), ``pair`` (shared-noise pair forward), ``config``
(typed recipe), ``algorithm`` (reward-model training on the one trainer), ``evaluate`` (accuracy protocol,
plots), ``calibration`` (pure), ``report`` (eval-rm), ``cli`` (train-rm / eval-rm / preprocess).
"""
