"""Train suite: forward + backward of the decoupled-attention op under autograd.

For each shape two training calls:

* ``all``: every input requires grad (the original IP-Adapter recipe below a trained layer);
* ``ip-only``: only the IP keys/values do (a style-block adapter over a frozen UNet).

Providers, all timed as ``out = f(); torch.autograd.grad(out, leaves, dout)``:

* ``diffusers`` (baseline): diffusers' ``IPAdapterAttnProcessor2_0`` math under autograd;
* ``ours-torch``: the op, torch backend (eager: autograd through SDPA);
* ``ours-torch-op``: the custom op with its registered backward, torch backend (the
  formulas of ``kernels/backward.py``: what ``torch.compile`` traces on CPU);
* ``ours-triton``: the op with the Triton forward and backward kernels (GPU only).

Memory: on a GPU ``peak_mb`` is ``torch.cuda.max_memory_allocated`` over one step, above
what was allocated before it.  On CPU (no allocator statistics) ``saved_mb`` is what
autograd keeps for the backward (``saved_tensors_hooks``, one count per storage,
inputs included): the activation memory a training step pays per layer.
"""
from __future__ import annotations

import gc
from typing import Callable, List, Optional

import torch

from instantstyle.kernels import decoupled_attention, normalize_inputs

from . import providers as P
from .shapes import Shape, kernel_shapes
from .suites import Context, add_speedups, dtype_name, record_timings, short_error

GRAD_SETS = ("all", "ip-only")


def _leaves(case: P.KernelCase, grads: str) -> List[torch.Tensor]:
    names = [case.q, case.k, case.v] if grads == "all" else []
    return names + list(case.ip_k) + list(case.ip_v)


def _custom_op(case: P.KernelCase):
    i = normalize_inputs(case.q, case.k, case.v, case.ip_k, case.ip_v, list(case.scales))
    return torch.ops.instantstyle.decoupled_attention(i.q, i.k, i.v, list(i.ip_k), list(i.ip_v), i.ip_scale, i.ip_mask,
                                                      i.text_bias, i.sm_scale, "torch")


FORWARDS = {
    "diffusers": lambda c: P.diffusers_math(c.q, c.k, c.v, c.ip_k, c.ip_v, c.scales),
    "ours-torch": lambda c: decoupled_attention(c.q, c.k, c.v, c.ip_k, c.ip_v, list(c.scales), backend="torch"),
    "ours-torch-op": _custom_op,
    "ours-triton": lambda c: decoupled_attention(c.q, c.k, c.v, c.ip_k, c.ip_v, list(c.scales), backend="triton"),
}


def _step(forward: Callable, case: P.KernelCase, leaves, dout):
    def run():
        out = forward(case)
        return torch.autograd.grad(out, leaves, dout)
    return run


def saved_megabytes(fn: Callable) -> float:
    """MB autograd saves for the backward during ``fn()`` (each storage counted once)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def peak_megabytes(fn: Callable, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


class TrainSuite:
    name = "train"
    description = "op forward+backward under autograd: ours (triton, torch, custom op) vs diffusers' math"

    def unavailable(self, ctx: Context) -> Optional[str]:
        return None

    def _plan(self, ctx: Context):
        return [(s, d, g) for s in kernel_shapes(ctx.quick, ctx.shape_filter) for d in ctx.dtypes for g in GRAD_SETS]

    def _providers(self, ctx: Context):
        return [n for n in FORWARDS if not ctx.provider_filter or n in ctx.provider_filter or n == "diffusers"]

    def planned(self, ctx: Context) -> int:
        return len(self._plan(ctx)) * len(self._providers(ctx))

    def run(self, ctx: Context) -> List[dict]:
        if not ctx.is_gpu:
            ctx.note("train suite on CPU: ours-triton would only run interpreted ('not timed (no GPU)'); "
                     "memory is saved_mb (what autograd keeps for the backward), not an allocator peak.")
        rows: List[dict] = []
        for shape, dtype, grads in self._plan(ctx):
            rows += self._run_case(ctx, shape, dtype, grads)
            gc.collect()
            if ctx.is_gpu:
                torch.cuda.empty_cache()
        return rows

    def _run_case(self, ctx: Context, shape: Shape, dtype, grads: str) -> List[dict]:
        case = P.make_case(shape, dtype, ctx.device, seed=0)
        for t in _leaves(case, grads):
            t.requires_grad_(True)
        leaves = _leaves(case, grads)
        dout = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(1)).to(ctx.device, dtype)
        label = f"{shape.name}-{grads}"
        rows, fns_by_name, reference = [], {}, None
        for name in self._providers(ctx):
            row = {"suite": self.name, "case": label, "provider": name, "baseline": name == "diffusers",
                   "dtype": dtype_name(dtype), "shape_desc": f"{shape.describe()} grads={grads}", "shape": shape.as_dict(),
                   "grads": grads, "input_sets": 1, "status": "ok", "ms": None, "ms_graph": None}
            rows.append(row)
            if name == "ours-triton" and not ctx.is_gpu:
                row["status"] = P.NOT_TIMED_NO_GPU
                continue
            step = _step(FORWARDS[name], case, leaves, dout)
            try:
                got = step()  # also the first warm-up
                if reference is None:
                    reference = got
                else:  # gradients agree with the baseline's (same inputs, same dO)
                    row["grad_rel_err"] = max(P.relative_error(g, r.to(torch.float64)) for g, r in zip(got, reference))
                if ctx.is_gpu:
                    row["peak_mb"] = round(peak_megabytes(step, ctx.device), 2)
                else:
                    row["saved_mb"] = round(saved_megabytes(lambda f=FORWARDS[name]: f(case)), 2)
                fns_by_name[name] = [step]
            except Exception as exc:
                row["status"] = short_error(exc)
        # One timed run per step, no graphs: a backward allocates and is not capture-safe here.
        graphs, ctx.graphs = ctx.graphs, False
        try:
            record_timings(ctx, rows, fns_by_name, f"{label} {dtype_name(dtype)}")
        finally:
            ctx.graphs = graphs
        for row in rows:
            ctx.tick(f"{label} {row['provider']}")
        add_speedups(rows)
        return rows
