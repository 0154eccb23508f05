"""Host suite: the Python and dispatch cost of ONE processor call, ours vs diffusers'.

Tensors are tiny (2 x 16 queries, 2 heads x 32), so the arithmetic is negligible and
what is timed is what bounds an eager GPU step: argument handling, tensor plumbing,
dispatch, launches enqueued.  An SDXL UNet step makes 140 such calls; on a GPU in
eager mode the host work of each must stay below the device work it enqueues.

* ``ip-layer``: diffusers' ``IPAdapterAttnProcessor2_0`` (baseline) vs
  ``FusedIPAdapterAttnProcessor`` (same weights), one IP-Adapter;
* ``plain-layer``: diffusers' ``AttnProcessor2_0`` (baseline) vs ``FusedAttnProcessor``
  (a layer a method is attached to, with nothing attached at this step).

Always wall-clock on the host, interleaved round-robin (each timed run is a batch of
calls; on a GPU the batch ends with a synchronize).
"""
from __future__ import annotations

import copy
from typing import List, Optional

import torch

from ..processors.core import step_cache
from . import timing
from .suites import Context, add_speedups, dtype_name, name_matches, short_error

CALLS_PER_RUN = 100
CASES = ["ip-layer", "plain-layer"]


def _modules(device, dtype):
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor2_0,
        IPAdapterAttnProcessor2_0,
    )

    from ..processors import FusedAttnProcessor
    from ..processors.unet.conversion import fuse_ip_processor

    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32).to(device=device, dtype=dtype).eval()
    base_ip = IPAdapterAttnProcessor2_0(64, 32, num_tokens=(4,), scale=0.8).to(device=device, dtype=dtype).eval()
    pairs = {
        "ip-layer": {"diffusers": base_ip, "fused": fuse_ip_processor(base_ip)},
        "plain-layer": {"diffusers": AttnProcessor2_0(), "fused": FusedAttnProcessor()},
    }
    out = {}
    for case, procs in pairs.items():
        out[case] = {}
        for name, proc in procs.items():
            module = copy.deepcopy(attn)
            module.set_processor(proc)
            out[case][name] = module
    return out


def _batch(module, x, context, sync):
    def run():
        # no_grad, as diffusers' pipelines call the UNet; one run, as the calls of one
        # denoising run (a bare layer has no model step hook to say so)
        with torch.no_grad(), step_cache.one_run():
            for _ in range(CALLS_PER_RUN):
                module(x, encoder_hidden_states=context)
            sync()
    return run


class HostSuite:
    name = "host"
    description = "host (Python + dispatch) time of one processor call, tiny tensors: ours vs diffusers'"

    def unavailable(self, ctx: Context) -> Optional[str]:
        return None

    def _cases(self, ctx: Context) -> List[str]:
        return [c for c in CASES if name_matches(c, ctx.shape_filter, CASES)]

    def planned(self, ctx: Context) -> int:
        return 2 * len(self._cases(ctx))

    def run(self, ctx: Context) -> List[dict]:
        dtype = ctx.dtypes[0]
        g = torch.Generator().manual_seed(0)
        rand = lambda *s: torch.randn(*s, generator=g).to(device=ctx.device, dtype=dtype)  # noqa: E731
        x, text, ip = rand(2, 16, 64), rand(2, 7, 32), rand(2, 1, 4, 32)
        contexts = {"ip-layer": (text, [ip]), "plain-layer": text}
        sync = torch.cuda.synchronize if ctx.is_gpu else (lambda: None)
        rows = []
        for case, modules in _modules(ctx.device, dtype).items():
            if case not in self._cases(ctx):
                continue
            case_rows, fns = [], {}
            for name, module in modules.items():
                row = {"suite": self.name, "case": case, "provider": name, "baseline": name == "diffusers",
                       "dtype": dtype_name(dtype), "shape_desc": f"B=2 N=16 H=2 D=32; ms = per call ({CALLS_PER_RUN} per run)",
                       "status": "ok", "ms": None, "ms_graph": None}
                case_rows.append(row)
                try:
                    fns[name] = [_batch(module, x, contexts[case], sync)]
                    fns[name][0]()
                except Exception as exc:
                    row["status"] = short_error(exc)
                    fns.pop(name, None)
            timings = timing.cpu_time_interleaved({n: f[0] for n, f in fns.items()}, warmup=3,
                                                  min_runs=5 if ctx.quick else 15, max_runs=15 if ctx.quick else 60,
                                                  budget_s=0.5 if ctx.quick else 3.0)
            for row in case_rows:
                t = timings.get(row["provider"])
                if t is not None:
                    row.update({k: v / CALLS_PER_RUN if isinstance(v, float) else v for k, v in t.as_fields("ms").items()})
                ctx.tick(f"{case} {row['provider']}")
            add_speedups(case_rows)
            rows += case_rows
        return rows

