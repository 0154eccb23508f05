"""Kernel suite: the decoupled-attention op alone, every provider on the same inputs.

For each shape and dtype: random input sets (rotated on a GPU so the footprint exceeds
L2), a float64 reference for the error column, then every provider timed eagerly and,
on a GPU, with CUDA-graph replay.  Rows carry bytes, FLOPs and achieved bandwidth
(:mod:`.roofline`), the speedup over diffusers' math, and, for the fused kernel at the
issue-2 shape, the targets (>= 3x diffusers, >= 70% of copy bandwidth on Q + O).
"""
from __future__ import annotations

import gc
from typing import List, Optional

import torch

from . import providers as P
from .roofline import roofline_fields
from .shapes import TARGET_SHAPE_NAME, kernel_shapes
from .suites import Context, add_speedups, dtype_name, record_timings, short_error

TARGET_SPEEDUP = 3.0
TARGET_PCT_COPY_BW_QO = 70.0
TARGET_PROVIDER = "ours-triton"


def _target(row: dict) -> dict:
    """Issue 2's targets for the fused kernel, judged on numbers from this run."""
    t = {"speedup_min": TARGET_SPEEDUP, "pct_copy_bw_qo_min": TARGET_PCT_COPY_BW_QO}
    if row["status"] != "ok":
        t.update(met=None, verdict=f"not measured: {row['status']}")
        return t
    graph = row.get("ms_graph") is not None
    speedup = row.get("speedup_graph") if graph else row.get("speedup")
    pct = (row.get("roofline_graph") or {}).get("pct_copy_bw_qo") if graph else row.get("pct_copy_bw_qo")
    ok_speed = speedup is not None and speedup >= TARGET_SPEEDUP
    ok_bw = pct is not None and pct >= TARGET_PCT_COPY_BW_QO
    timer = "cuda-graph" if graph else row.get("ms_method", "")
    pct_text = "n/a" if pct is None else f"{pct:.0f}%"
    t.update(
        timer=timer, speedup=speedup, pct_copy_bw_qo=pct, met=ok_speed and ok_bw,
        verdict=(f"speedup {speedup:.2f}x vs diffusers (target >= {TARGET_SPEEDUP:g}x): "
                 f"{'PASS' if ok_speed else 'MISS'}; Q+O bandwidth {pct_text} of copy "
                 f"(target >= {TARGET_PCT_COPY_BW_QO:g}%): {'PASS' if ok_bw else 'MISS'} [{timer}]"),
    )
    return t


class KernelSuite:
    name = "kernel"
    description = "decoupled-attention op: ours (triton, torch) vs diffusers' math, xformers, eager"

    def unavailable(self, ctx: Context) -> Optional[str]:
        return None

    def _plan(self, ctx: Context):
        return [(s, d) for s in kernel_shapes(ctx.quick, ctx.shape_filter) for d in ctx.dtypes]

    def planned(self, ctx: Context) -> int:
        return len(self._plan(ctx)) * len(P.select(ctx.provider_filter))

    def run(self, ctx: Context) -> List[dict]:
        if not ctx.is_gpu:
            ctx.note("kernel suite on CPU: the Triton kernel would only run interpreted, so its rows say "
                     f"'{P.NOT_TIMED_NO_GPU}'; the GPU targets can't be judged here.")
        rows: List[dict] = []
        for shape, dtype in self._plan(ctx):
            rows += self._run_shape(ctx, shape, dtype)
            gc.collect()
            if ctx.is_gpu:
                torch.cuda.empty_cache()
        return rows

    def _run_shape(self, ctx: Context, shape, dtype) -> List[dict]:
        first = P.make_case(shape, dtype, ctx.device, seed=0)
        cases = [first] + [P.make_case(shape, dtype, ctx.device, seed=i) for i in range(1, ctx.rotation(first.nbytes))]
        ref = P.reference_output(first)
        elem = first.q.element_size()
        rows, fns_by_name = [], {}
        for provider in P.select(ctx.provider_filter):
            row = {
                "suite": self.name, "case": shape.name, "provider": provider.name, "baseline": provider.baseline,
                "dtype": dtype_name(dtype), "shape_desc": shape.describe(), "shape": shape.as_dict(),
                "input_sets": len(cases), "status": "ok", "ms": None, "ms_graph": None,
            }
            why = provider.status(ctx.device, dtype, shape)
            if why:
                row["status"] = why
            else:
                try:
                    fns = [provider.build(c) for c in cases]
                    row["rel_err"] = P.relative_error(fns[0](), ref)  # also the first warm-up call
                    fns_by_name[provider.name] = fns
                except Exception as exc:
                    row["status"] = short_error(exc)
            rows.append(row)
        record_timings(ctx, rows, fns_by_name, f"{shape.name} {dtype_name(dtype)}")
        for row in rows:
            name = row["provider"]
            row.update(roofline_fields(shape, elem, row.get("ms"), ctx.copy_gbps))
            if row.get("ms_graph") is not None:
                row["roofline_graph"] = roofline_fields(shape, elem, row["ms_graph"], ctx.copy_gbps)
            ctx.tick(f"{shape.name} {name}")
        add_speedups(rows)
        for row in rows:
            if row["provider"] == TARGET_PROVIDER and shape.name == TARGET_SHAPE_NAME:
                row["target"] = _target(row)
        return rows

