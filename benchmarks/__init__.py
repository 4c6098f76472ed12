"""Benchmarks of dinalrm-align (not part of the installed package).

Run from the repository root as modules::

    python -m benchmarks.flops      # real-scale FLOPs on the meta device (no weights, no GPU)
    python -m benchmarks.cpu        # reduced-scale latency / memory ratios on this machine
    python -m benchmarks.gpu        # full-scale bf16 time / memory on a CUDA card (--small: CPU smoke run)

See ``benchmarks/README.md`` and ``docs/benchmarks.md``.
"""
