"""Benchmark suite of capsnet_ext: every routing backend against the eager and compiled
reference, with the floor (roofline), memory, correctness gate, sweeps and end-to-end CapsNet
training throughput.

Run it with ``capsnet-ext bench`` (``--help`` lists the options; ``--quick`` is a short CPU-sized
run). Modules:

* :mod:`benchmarks.timing`: GPU timing with CUDA events, CPU timing with a wall clock.
* :mod:`benchmarks.memory`: peak allocated memory (GPU) and bytes saved for backward.
* :mod:`benchmarks.floors`: FLOPs and minimal bytes per op, measured device ceilings.
* :mod:`benchmarks.contenders`: the eager reference, ``torch.compile`` of it, kernel backends.
* :mod:`benchmarks.correctness`: the gate every contender passes before it is timed.
* :mod:`benchmarks.suite`: shapes, sweeps and the per-case measurement loop.
* :mod:`benchmarks.end_to_end`: training steps per second of the full CapsNet.
* :mod:`benchmarks.report`: metadata, JSON, the stdout table and the plots.
* :mod:`benchmarks.make_readme`: ``benchmarks/README.md`` from the committed JSON.
"""
