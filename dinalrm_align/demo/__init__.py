"""The colour world: a synthetic task with a known golden reward, run end to end on the tiny models.

``dinalrm-align demo`` (``make demo``) runs :func:`dinalrm_align.demo.colour_world.main`.
Modules: ``world`` (vocabulary, colour optics, golden reward), ``pairs`` (policy samples, tints,
simulated annotator), ``plots`` (the figure), ``colour_world`` (stages, report, CLI).
"""
