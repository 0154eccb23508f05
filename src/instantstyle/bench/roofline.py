"""Bytes, FLOPs and bandwidth for one decoupled-attention call.

The op is memory-bound (arithmetic intensity ~ Lt + sum L_i FLOP/byte, far below a
GPU's ridge point), so the figure of merit is bandwidth, not FLOP/s.  The bytes are
the *ideal* traffic of a fused kernel, the same for every provider, so achieved GB/s
is comparable across them ("effective bandwidth")::

    Q read   = B*N*H*D            elements
    K/V read = 2*B*H*D*(Lt + sum L_i)
    O written= B*N*H*D

    FLOPs    = 4*B*H*N*D*(Lt + sum L_i)     # QK^T and PV, 2 FLOP per multiply-add

Issue 2's bandwidth target counts only Q read + O written (``bytes_qo``); K/V are
small at SDXL shapes.
"""
from __future__ import annotations

from typing import Optional

from .shapes import Shape


def bytes_moved(shape: Shape, elem_size: int) -> dict:
    """Ideal bytes of one call: ``q``, ``kv``, ``o``, ``qo`` (= q + o) and ``total``."""
    qo_elems = shape.B * shape.N * shape.H * shape.D
    kv_elems = 2 * shape.B * shape.H * shape.D * (shape.Lt + shape.ip_total)
    q = o = qo_elems * elem_size
    kv = kv_elems * elem_size
    return {"q": q, "kv": kv, "o": o, "qo": q + o, "total": q + kv + o}


def flops(shape: Shape) -> int:
    """Matmul FLOPs of one call (softmax and the scaled add are not counted)."""
    return 4 * shape.B * shape.H * shape.N * shape.D * (shape.Lt + shape.ip_total)


def roofline_fields(shape: Shape, elem_size: int, ms: Optional[float], copy_gbps: Optional[float]) -> dict:
    """Row fields: bytes, FLOPs, intensity and, when timed, GB/s and % of copy bandwidth."""
    b = bytes_moved(shape, elem_size)
    f = flops(shape)
    row = {
        "bytes": b["total"],
        "bytes_qo": b["qo"],
        "flops": f,
        "intensity_flop_per_byte": round(f / b["total"], 2),
        "gbps": None,
        "gbps_qo": None,
        "tflops": None,
        "pct_copy_bw": None,
        "pct_copy_bw_qo": None,
    }
    if ms is None or ms <= 0:
        return row
    seconds = ms * 1e-3
    row["gbps"] = b["total"] / seconds / 1e9
    row["gbps_qo"] = b["qo"] / seconds / 1e9
    row["tflops"] = f / seconds / 1e12
    if copy_gbps:
        row["pct_copy_bw"] = 100.0 * row["gbps"] / copy_gbps
        row["pct_copy_bw_qo"] = 100.0 * row["gbps_qo"] / copy_gbps
    return row
