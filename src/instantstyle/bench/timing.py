"""Timers: CUDA events (``triton.testing.do_bench``), CUDA-graph replay, and CPU wall clock.

GPU
    * Every timed callable comes as a *list*, one per input set: the sets together are
      bigger than L2 (:func:`rotation_sets`), and calls rotate through them, so no call
      finds its inputs in cache.  ``do_bench`` also flushes L2 between calls.
    * Eager: ``do_bench`` (CUDA events, after warm-up), median / p20 / p80.
    * Graph: one CUDA graph holds one call per input set, in order; it is replayed under
      ``do_bench`` and the time divided by the number of calls.  At SDXL sizes one op is
      a few microseconds, so launch overhead hides the kernel unless graphs remove it.
CPU
    Median / p20 / p80 of repeated ``time.perf_counter`` runs after warm-up, stopping at
    ``max_runs`` or when the time budget is spent (at least ``min_runs``).  The providers
    of one case run round-robin, so load from other processes hits them alike.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

#: Assumed L2 size when the device does not report one (H100: 50 MB, H200: 60 MB).
DEFAULT_L2_BYTES = 60 * 2**20


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    method: str

    def as_fields(self, prefix: str = "ms") -> dict:
        return {
            prefix: self.median_ms,
            f"{prefix}_p20": self.p20_ms,
            f"{prefix}_p80": self.p80_ms,
            f"{prefix}_runs": self.runs,
            f"{prefix}_method": self.method,
        }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (numpy's default)."""
    if not sorted_values:
        raise ValueError("no samples")
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float], method: str) -> Timing:
    s = sorted(samples_ms)
    return Timing(_quantile(s, 0.5), _quantile(s, 0.2), _quantile(s, 0.8), len(s), method)


# --------------------------------------------------------------------------- CPU


def cpu_time(fn: Callable[[], object], warmup: int = 2, min_runs: int = 5, max_runs: int = 30,
             budget_s: float = 1.0) -> Timing:
    """Wall-clock median of ``fn()`` over repeated runs (CPU ops are synchronous)."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= min_runs and time.perf_counter() - start > budget_s:
            break
    return summarize(samples, "perf_counter")


def cpu_time_interleaved(fns: Dict[str, Callable[[], object]], warmup: int = 2, min_runs: int = 5,
                         max_runs: int = 30, budget_s: float = 1.0) -> Dict[str, Timing]:
    """:func:`cpu_time` for several callables at once, run round-robin.

    On a shared machine the load changes from second to second; interleaving makes the
    baseline and each candidate see the same load, so their *ratio* stays meaningful
    even when the absolute times drift.  The budget is per callable.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(max_runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= min_runs and time.perf_counter() - start > budget_s * len(fns):
            break
    return {name: summarize(s, "perf_counter (interleaved)") for name, s in samples.items()}


# --------------------------------------------------------------------------- GPU


def l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotation_sets(bytes_per_set: int, l2: int, max_sets: int = 32) -> int:
    """How many input sets make a footprint of at least 2x L2 (at least 2, at most ``max_sets``)."""
    if bytes_per_set <= 0:
        return 1
    return max(2, min(max_sets, math.ceil(2 * l2 / bytes_per_set)))


class Rotator:
    """Calls ``fns[0]``, ``fns[1]``, ... in turn: one per input set."""

    def __init__(self, fns: Sequence[Callable[[], object]]):
        self.fns, self.i = list(fns), 0

    def __call__(self):
        fn = self.fns[self.i]
        self.i = (self.i + 1) % len(self.fns)
        return fn()


def gpu_time(fns: Sequence[Callable[[], object]], warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """CUDA-event timing through ``triton.testing.do_bench``, rotating over input sets."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(Rotator(fns), warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    runs = max(1, int(rep_ms / max(med, 1e-3)))  # do_bench's own estimate of its repeat count
    return Timing(med, p20, p80, runs, "cuda-events")


def gpu_graph_time(fns: Sequence[Callable[[], object]], warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """Capture one graph with a call per input set, replay it, report time per call.

    Raises whatever capture raises (e.g. a provider that synchronises): callers record
    the error instead of a number.
    """
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    n = len(fns)
    med, p20, p80 = do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    runs = max(1, int(rep_ms / max(med, 1e-3)))
    del graph
    return Timing(med / n, p20 / n, p80 / n, runs * n, "cuda-graph")


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2**30) -> Optional[float]:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench

    free, _ = torch.cuda.mem_get_info(device)
    nbytes = min(nbytes, free // 4) // 2 * 2
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9  # the 2 x nbytes buffers are freed on return
