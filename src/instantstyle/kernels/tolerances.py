"""Accuracy each backend must reach against the float64 reference, per compute precision.

The metric is the relative L2 error ``||out - ref|| / ||ref||`` plus an element-wise
``|out - ref| <= atol * max(1, rms(ref)) + rtol * |ref|`` bound.  Values sit a few times above what one
rounding of the output already costs in that precision (fp16 eps 9.8e-4, bf16 7.8e-3,
tf32 has a 10-bit mantissa like fp16), so a wrong mask, scale or softmax fails them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Tolerance(NamedTuple):
    rel_l2: float
    atol: float
    rtol: float


TOLERANCES = {
    "fp64": Tolerance(1e-12, 1e-12, 1e-12),
    "fp32": Tolerance(1e-5, 1e-5, 1e-5),
    "tf32": Tolerance(3e-3, 5e-3, 5e-3),
    "fp16": Tolerance(2e-3, 5e-3, 5e-3),
    "bf16": Tolerance(1.6e-2, 4e-2, 4e-2),
}

def check_close(out: torch.Tensor, ref: torch.Tensor, precision: str) -> None:
    """Raise AssertionError with the measured errors if ``out`` misses ``ref``'s tolerance."""
    tol = TOLERANCES[precision]
    out64, ref64 = out.to(torch.float64), ref.to(torch.float64)
    if not torch.isfinite(out64).all():
        raise AssertionError(f"output has {int((~torch.isfinite(out64)).sum())} non-finite values")
    err = (out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)
    # atol is in units of the output's RMS (at least 1): summing several scaled streams
    # grows the output, and with it the rounding error of every low-precision term.
    magnitude = max(1.0, float(ref64.norm() / max(ref64.numel(), 1) ** 0.5))
    worst = ((out64 - ref64).abs() - tol.rtol * ref64.abs()).max() / magnitude
    if err > tol.rel_l2 or worst > tol.atol:
        raise AssertionError(
            f"{precision}: relative L2 error {err:.3g} (limit {tol.rel_l2}), "
            f"worst (|out - ref| - rtol*|ref|) / max(1, rms(ref)) = {worst:.3g} (limit {tol.atol})"
        )
