"""Processor suite: one whole attn2 call (projections included), as the UNet makes it,
and one whole Flux double-stream / SD3.5 joint-attention call (``dit_layers``).

A diffusers ``Attention`` module with SDXL's cross-attention sizes runs with:

* ``diffusers`` (baseline): diffusers' ``IPAdapterAttnProcessor2_0``;
* ``fused``: ``instantstyle.processors.FusedIPAdapterAttnProcessor``, built with the same
  constructor and loaded with the same IP weights (so outputs must agree);
* ``no-ip``: diffusers' ``AttnProcessor2_0`` on the text alone, the floor any IP
  processor adds to.

The DiT cases compare diffusers' ``FluxIPAdapterAttnProcessor`` (XLabs, 16 IP tokens) and
``SD3IPAdapterJointAttnProcessor2_0`` (InstantX, 64 tokens) with ours; their ``no-ip`` row
is the layer's plain processor.  The main joint attention (long keys) runs on diffusers'
path in both, so what differs is the IP branch only.

The Wan cases (``wan_layers``) time one whole Wan 2.1 I2V ``attn2`` call: diffusers'
``WanAttnProcessor`` (two attention calls, text and image, summed) against ours (one op
call); their ``no-ip`` row is the layer without its image branch (text keys only).

When the fused processor does not exist yet, its rows say "not available yet".
"""
from __future__ import annotations

import copy
import functools
import gc
from dataclasses import dataclass
from typing import List, Optional

import torch

from . import dit_layers, wan_layers
from .suites import (
    Context,
    add_speedups,
    dtype_name,
    name_matches,
    record_timings,
    short_error,
)

FUSED_CLASS = "FusedIPAdapterAttnProcessor"
NOT_AVAILABLE = f"not available yet (instantstyle.processors has no {FUSED_CLASS})"


def fused_processor_class():
    """The fused processor class, or None while ``instantstyle.processors`` lacks it."""
    try:
        import instantstyle.processors as procs
    except Exception:
        return None
    return getattr(procs, FUSED_CLASS, None)


@dataclass(frozen=True)
class AttnCase:
    name: str
    B: int
    N: int
    channels: int
    heads: int
    Lt: int = 77
    cross_dim: int = 2048
    ip_tokens: int = 4
    family: str = "unet"  # "flux" / "sd3": a whole joint-attention layer (dit_layers); "wan": attn2 (wan_layers)

    def describe(self) -> str:
        return f"B={self.B} N={self.N} C={self.channels} H={self.heads} Lt={self.Lt} ip={self.ip_tokens}"


CASES = [
    AttnCase("sdxl-attn2-4096x640", B=2, N=4096, channels=640, heads=10),
    AttnCase("sdxl-attn2-1024x1280", B=2, N=1024, channels=1280, heads=20),
    # FLUX.1-dev at 1024²: 4096 image + 512 T5 tokens, no CFG batch; XLabs v2, 16 tokens
    AttnCase("flux-double-1024", B=1, N=4096, channels=3072, heads=24, Lt=512, cross_dim=4096, ip_tokens=16, family="flux"),
    # SD3.5-Large at 1024²: 4096 image + 333 text tokens, CFG batch; InstantX, 64 tokens
    AttnCase("sd35-joint-1024", B=2, N=4096, channels=2432, heads=38, Lt=333, cross_dim=2432, ip_tokens=64, family="sd3"),
    # the same layers at 256² (256 image tokens): what --quick times on a CPU in seconds
    AttnCase("flux-double-256", B=1, N=256, channels=3072, heads=24, Lt=512, cross_dim=4096, ip_tokens=16, family="flux"),
    AttnCase("sd35-joint-256", B=2, N=256, channels=2432, heads=38, Lt=333, cross_dim=2432, ip_tokens=64, family="sd3"),
    # Wan 2.1 I2V 14B attn2, CFG batch 2: 40 heads x 128, 512 text + 257 CLIP image tokens (FLF2V: 514);
    # queries 21x30x52 = 32,760 at 480x832 / 81 frames, 21x45x80 = 75,600 at 720x1280
    AttnCase("wan-attn2-480p", B=2, N=32760, channels=5120, heads=40, Lt=512, cross_dim=5120, ip_tokens=257, family="wan"),
    AttnCase("wan-attn2-720p", B=2, N=75600, channels=5120, heads=40, Lt=512, cross_dim=5120, ip_tokens=257, family="wan"),
    AttnCase("wan-flf2v-attn2-480p", B=2, N=32760, channels=5120, heads=40, Lt=512, cross_dim=5120, ip_tokens=514, family="wan"),
    # what --quick times on a CPU: Wan's key lengths and head dim (512 text + 257 image keys, D = 128) with the
    # layer cut to 4 heads and 780 queries (two 240x416 latent frames), ~0.1 s a call on one core
    AttnCase("wan-attn2-cpu", B=2, N=780, channels=512, heads=4, Lt=512, cross_dim=512, ip_tokens=257, family="wan"),
]
QUICK_CASES = [CASES[1], CASES[4], CASES[5], CASES[9]]
GPU_SIZED = [CASES[2], CASES[3], CASES[6], CASES[7], CASES[8]]


def _inputs(case: AttnCase, dtype, device, seed):
    if case.family == "wan":
        return wan_layers.inputs(case, dtype, device, seed)
    if case.family != "unet":
        return dit_layers.inputs(case, dtype, device, seed)
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return rand(case.B, case.N, case.channels), rand(case.B, case.Lt, case.cross_dim), \
        rand(case.B, 1, case.ip_tokens, case.cross_dim)


def build_attention(case: AttnCase, dtype, device):
    """attn2 of an SDXL BasicTransformerBlock, random weights, plus the two IP processors."""
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor2_0,
        IPAdapterAttnProcessor2_0,
    )

    if case.family == "wan":
        attn, procs = wan_layers.build_wan(case, dtype, device, wan_layers.fused_class())
        return _placed(attn, procs, dtype, device)
    if case.family != "unet":
        build = dit_layers.build_flux if case.family == "flux" else dit_layers.build_sd3
        attn, procs = build(case, dtype, device, dit_layers.fused_classes()[case.family])
        return _placed(attn, procs, dtype, device)
    torch.manual_seed(0)
    attn = Attention(query_dim=case.channels, cross_attention_dim=case.cross_dim, heads=case.heads,
                     dim_head=case.channels // case.heads, bias=False, out_bias=True)
    base = IPAdapterAttnProcessor2_0(hidden_size=case.channels, cross_attention_dim=case.cross_dim,
                                     num_tokens=(case.ip_tokens,), scale=1.0)
    procs = {"diffusers": base, "no-ip": AttnProcessor2_0()}
    cls = fused_processor_class()
    if cls is not None:
        fused = cls(hidden_size=case.channels, cross_attention_dim=case.cross_dim, num_tokens=(case.ip_tokens,), scale=1.0)
        fused.load_state_dict(base.state_dict())
        procs["fused"] = fused
    return _placed(attn, procs, dtype, device)


def _placed(attn, procs, dtype, device):
    attn.to(device=device, dtype=dtype).eval()
    for p in procs.values():
        if isinstance(p, torch.nn.Module):
            p.to(device=device, dtype=dtype).eval()
    return attn, procs


PROVIDERS = ["diffusers", "fused", "no-ip"]


def _call(module, inputs, ip: bool):
    if len(inputs) == 2:  # a Wan attn2 layer: (x, [image ; text] context)
        return wan_layers.call(module, inputs, ip)
    if len(inputs) == 4:  # a Flux / SD3 layer
        return dit_layers.call(module, inputs, ip)
    x, text, ip_states = inputs
    with torch.inference_mode():
        return module(x, encoder_hidden_states=(text, [ip_states]) if ip else text)


class ProcessorSuite:
    name = "processor"
    description = ("one attn2 call (SDXL, Wan 2.1 I2V) or joint-attention layer call (Flux, SD3.5), projections "
                   "included: fused processor vs diffusers' IP processor (Wan: its two-call WanAttnProcessor)")

    def unavailable(self, ctx: Context) -> Optional[str]:
        return None  # the diffusers rows always run; the fused rows say when they can't

    def _plan(self, ctx: Context):
        cases = QUICK_CASES if ctx.quick else CASES
        if not ctx.is_gpu and not ctx.shape_filter:
            # a 1024² DiT layer takes 6-13 s a call on a CPU and shows nothing its 256² twin doesn't;
            # on a CPU it runs only when --shape names it
            cases = [c for c in cases if c not in GPU_SIZED]
        cases = [c for c in cases if name_matches(c.name, ctx.shape_filter, [x.name for x in CASES])]
        return [(c, d) for c in cases for d in ctx.dtypes]

    def planned(self, ctx: Context) -> int:
        return len(self._plan(ctx)) * len(PROVIDERS)

    def run(self, ctx: Context) -> List[dict]:
        if fused_processor_class() is None:
            ctx.note(f"processor suite: {NOT_AVAILABLE}; only diffusers' processors were timed.")
        rows = []
        for case, dtype in self._plan(ctx):
            rows += self._run_case(ctx, case, dtype)
            gc.collect()
        return rows

    def _run_case(self, ctx: Context, case: AttnCase, dtype) -> List[dict]:
        attn, procs = build_attention(case, dtype, ctx.device)
        one = _inputs(case, dtype, ctx.device, 0)
        per_set = sum(t.numel() * t.element_size() for t in _tensors(one)) * 2
        sets = [one] + [_inputs(case, dtype, ctx.device, i) for i in range(1, ctx.rotation(per_set))]
        rows, fns_by_name, base_out = [], {}, None
        for name in PROVIDERS:
            row = {"suite": self.name, "case": case.name, "provider": name, "baseline": name == "diffusers",
                   "dtype": dtype_name(dtype), "shape_desc": case.describe(), "status": "ok", "ms": None,
                   "ms_graph": None}
            rows.append(row)
            if name not in procs:
                row["status"] = NOT_AVAILABLE
                continue
            try:
                # One Attention module per provider (same weights), so providers can run interleaved.
                module = copy.deepcopy(attn)
                module.set_processor(procs[name])
                fns = [functools.partial(_call, module, s, name != "no-ip") for s in sets]
                out = fns[0]()
                if name == "diffusers":
                    base_out = out.double()
                elif name == "fused" and base_out is not None:
                    row["rel_diff_vs_baseline"] = float((out.double() - base_out).norm() / base_out.norm())
                fns_by_name[name] = fns
            except Exception as exc:
                row["status"] = short_error(exc)
        record_timings(ctx, rows, fns_by_name, f"{case.name} {dtype_name(dtype)}")
        for row in rows:
            ctx.tick(f"{case.name} {row['provider']}")
        add_speedups(rows)
        return rows


def _tensors(inputs) -> list:
    """The tensors of one input set (nested tuples and lists: RoPE, IP states)."""
    out = []
    for t in inputs:
        out += _tensors(t) if isinstance(t, (tuple, list)) else [t]
    return out
