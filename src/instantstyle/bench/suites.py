"""The suite registry and the context every suite runs in.

A suite is an object with ``name``, ``description``, ``unavailable(ctx)`` (None, or why
it can't run here), ``planned(ctx)`` (how many timed runs, for the progress bar) and
``run(ctx)`` returning rows.  Adding a suite = writing such a class and listing it in
:data:`SUITE_CLASSES`; the CLI, the files, the tables and the plot pick it up.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import timing


@dataclass
class Context:
    device: torch.device
    dtypes: List[torch.dtype]
    quick: bool
    shape_filter: Sequence[str] = ()
    provider_filter: Sequence[str] = ()
    graphs: bool = True
    copy_gbps: Optional[float] = None
    l2_bytes: Optional[int] = None
    notes: List[str] = field(default_factory=list)
    tick: Callable[[str], None] = lambda label: None  # one timed run done (progress bar)
    working: Callable[[str], None] = lambda label: None  # what is being timed now

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _cpu_settings(self, heavy: bool) -> dict:
        if heavy:  # whole-model calls: fewer, longer runs
            return dict(warmup=1, min_runs=3 if self.quick else 5, max_runs=10 if self.quick else 20,
                        budget_s=1.0 if self.quick else 5.0)
        return dict(warmup=2, min_runs=3 if self.quick else 5, max_runs=15 if self.quick else 50,
                    budget_s=0.4 if self.quick else 2.0)

    def time(self, fns, heavy: bool = False) -> timing.Timing:
        """Eager timing of one provider (a list of callables, one per input set)."""
        if self.is_gpu:
            return timing.gpu_time(fns, warmup_ms=100 if heavy else 25,
                                   rep_ms=1000 if heavy else (100 if self.quick else 200))
        return timing.cpu_time(timing.Rotator(fns), **self._cpu_settings(heavy))

    def time_many(self, fns_by_name: Dict[object, list], heavy: bool = False) -> Dict[object, object]:
        """Time several providers of one case: name -> Timing, or the exception it raised.

        GPU: one after the other (the device is ours alone).  CPU: round-robin, see
        :func:`timing.cpu_time_interleaved`.
        """
        if self.is_gpu:
            out = {}
            for name, fns in fns_by_name.items():
                try:
                    out[name] = self.time(fns, heavy)
                except Exception as exc:  # one provider failing must not lose the others' numbers
                    out[name] = exc
            return out
        if not fns_by_name:
            return {}
        rotated = {name: timing.Rotator(fns) for name, fns in fns_by_name.items()}
        try:
            return timing.cpu_time_interleaved(rotated, **self._cpu_settings(heavy))
        except Exception as exc:
            return {name: exc for name in fns_by_name}

    def time_graph(self, fns) -> timing.Timing:
        return timing.gpu_graph_time(fns, rep_ms=100 if self.quick else 200)

    def rotation(self, bytes_per_set: int) -> int:
        """Input sets to rotate over: enough to exceed L2 on a GPU; 1 on CPU."""
        if not self.is_gpu:
            return 1
        return timing.rotation_sets(bytes_per_set, self.l2_bytes or timing.DEFAULT_L2_BYTES)


def name_matches(name: str, filters: Sequence[str], exact_names: Sequence[str]) -> bool:
    """``--shape`` filtering: a filter that is exactly one of ``exact_names`` keeps only that
    case; any other filter keeps every case whose name contains it.  No filters keep all."""
    if not filters:
        return True
    return any(name == f if f in exact_names else f in name for f in filters)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = f"error: {type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def record_timings(ctx: Context, rows: List[dict], fns_by_name: Dict[str, list], label: str) -> None:
    """Time the prepared providers of one case (rows keyed by ``row["provider"]``) and store
    ``ms*`` fields, on a GPU also ``ms_graph*``, or the error, in their rows."""
    ctx.working(f"{label}: timing {', '.join(fns_by_name)}")
    timings = ctx.time_many(fns_by_name)
    for row in rows:
        result = timings.get(row["provider"])
        if result is None:
            continue
        if isinstance(result, Exception):
            row["status"] = short_error(result)
            continue
        row.update(result.as_fields("ms"))
        if ctx.is_gpu and ctx.graphs:
            try:
                row.update(ctx.time_graph(fns_by_name[row["provider"]]).as_fields("ms_graph"))
            except Exception as exc:  # capture can fail (e.g. a host sync); record it, keep going
                row["ms_graph_status"] = "graph " + short_error(exc)
            torch.cuda.synchronize()


def add_speedups(rows) -> None:
    """``speedup`` (eager) and ``speedup_graph``: baseline time / row time, within one case's rows."""
    base = next((r for r in rows if r["baseline"] and r["status"] == "ok"), None)
    for r in rows:
        for key, out in (("ms", "speedup"), ("ms_graph", "speedup_graph")):
            # no-ip does less work (no image tokens): a reference, not a competitor
            ok = base is not None and r["status"] == "ok" and r.get(key) and base.get(key) and r["provider"] != "no-ip"
            r[out] = base[key] / r[key] if ok else None


#: suite name -> "module:Class" (imported lazily, so one broken suite can't break the rest)
SUITE_CLASSES: Dict[str, str] = {
    "kernel": "instantstyle.bench.suite_kernel:KernelSuite",
    "processor": "instantstyle.bench.suite_processor:ProcessorSuite",
    "unet": "instantstyle.bench.suite_unet:UNetSuite",
    "host": "instantstyle.bench.suite_host:HostSuite",
    "train": "instantstyle.bench.suite_train:TrainSuite",
    "pack": "instantstyle.bench.suite_pack:PackSuite",
}


def suite_names() -> List[str]:
    return list(SUITE_CLASSES)


def load_suite(name: str):
    module_name, cls = SUITE_CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), cls)()
