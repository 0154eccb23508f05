"""Measurement: ``instantstyle bench`` (see :mod:`instantstyle.bench.cli`).

One module per job:

- ``cli``        argparse and orchestration (suites -> rows -> files -> tables)
- ``shapes``     the kernel-shape catalogue, full and ``--quick``
- ``providers``  the implementations the kernel suite compares (ours, diffusers' math, xformers, eager)
- ``suites``     the suite registry and the run context (device, dtypes, timers)
- ``suite_kernel`` / ``suite_processor`` / ``suite_unet``  the three suites
- ``timing``     CUDA-event / CUDA-graph / CPU timers, L2 rotation, copy bandwidth
- ``roofline``   bytes moved, FLOPs, achieved bandwidth
- ``results``    run metadata, the JSON-lines file, terminal and markdown tables
- ``plot``       the PNG, rendered from the stored rows
"""
