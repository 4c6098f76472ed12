"""The colour world: a synthetic task with a known golden reward, run end to end on the tiny models.

``dinalrm-align demo`` (``make demo``) runs :func:`dinalrm_align.demo.colour_world.main`.
Modules: ``config`` (sizes and hyper-parameters), ``world`` (vocabulary, colour optics, golden reward),
``pairs`` (policy samples, tints, simulated annotator), ``recipes`` (the reward-model and ReFL recipes),
``stages`` (world, pairs, reward model, ReFL, before/after), ``plots`` and ``report`` (the PNGs,
``report.json``, the printed summary), ``colour_world`` (the timed stages and the CLI).
"""
