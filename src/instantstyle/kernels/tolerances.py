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


#: Gradients against float64 autograd of the reference.  Looser than the forward's: a
#: gradient sums over queries (dK, dV, biases) or over heads and queries (scales, masks)
#: with cancellation, and the backward rounds P and dS to the input dtype for its dots,
#: as FlashAttention does.  ``atol`` is in units of the reference gradient's RMS (a
#: gradient has no natural scale of 1, unlike the op's output).
GRAD_TOLERANCES = {
    "fp64": Tolerance(1e-10, 1e-10, 1e-10),
    "fp32": Tolerance(3e-5, 2e-4, 1e-4),
    "tf32": Tolerance(1e-2, 5e-2, 2e-2),
    "fp16": Tolerance(5e-3, 3e-2, 1e-2),
    "bf16": Tolerance(4e-2, 2e-1, 8e-2),
}


def check_grad_close(name: str, grad: torch.Tensor, ref: torch.Tensor, precision: str) -> None:
    """Raise AssertionError naming the gradient if ``grad`` misses ``ref`` (float64) by more than
    :data:`GRAD_TOLERANCES`.  An all-zero reference (a one-key stream's dK: P is 1 whatever
    the logits) allows rounding noise up to ``rel_l2`` in absolute terms (unit-scale inputs)."""
    tol = GRAD_TOLERANCES[precision]
    if grad is None:
        raise AssertionError(f"{name}: no gradient")
    if grad.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(grad.shape)}, expected {tuple(ref.shape)}")
    g64, r64 = grad.to(torch.float64), ref.to(torch.float64)
    if not torch.isfinite(g64).all():
        raise AssertionError(f"{name}: {int((~torch.isfinite(g64)).sum())} non-finite values")
    rms = float(r64.norm() / max(r64.numel(), 1) ** 0.5)
    if rms == 0.0:
        if g64.abs().max() > tol.rel_l2:
            raise AssertionError(f"{name}: expected zeros, got max |grad| {float(g64.abs().max()):.3g} (limit {tol.rel_l2})")
        return
    err = float((g64 - r64).norm() / r64.norm())
    worst = float(((g64 - r64).abs() - tol.rtol * r64.abs()).max()) / rms
    if err > tol.rel_l2 or worst > tol.atol:
        raise AssertionError(f"{name} ({precision}): relative L2 error {err:.3g} (limit {tol.rel_l2}), "
                             f"worst (|g - ref| - rtol*|ref|) / rms(ref) = {worst:.3g} (limit {tol.atol})")
