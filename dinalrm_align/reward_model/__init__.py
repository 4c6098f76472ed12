"""The DiNa-LRM latent reward model on any supported backbone.

``config`` (the network definition), ``features`` (truncated copy of the family's transformer + tap hooks),
``head`` (the gated query head), ``model`` / ``scoring`` (:class:`LatentRewardModel` and its scoring API),
``noise`` (sigma table, noising), ``text`` (prompt encoding with the pipeline's own text stack),
``images`` (scoring images on disk), ``checkpoint`` (released and own layouts), ``validation`` (clear errors),
``tiny_build`` (random tiny reward models), ``cli_score`` (``dinalrm-align score``).
"""
