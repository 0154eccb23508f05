"""The implementations the kernel suite compares, all on the same (B, N, H, D) inputs.

* ``diffusers``   the baseline: diffusers' ``IPAdapterAttnProcessor2_0`` math after the
                  projections, line for line (transpose to (B, H, N, D), one SDPA per
                  softmax, transpose + reshape back, ``.to(dtype)``, ``scale *`` and add).
* ``ours-triton`` :func:`instantstyle.kernels.decoupled_attention`, ``backend="triton"``:
                  the fused kernel.  On CPU it would only run interpreted, so it is
                  listed as "not timed (no GPU)", never with a number.
* ``ours-torch``  the same op, ``backend="torch"`` (the fallback on every device).
* ``xformers``    diffusers' math with ``xformers.ops.memory_efficient_attention`` for
                  both calls, when xformers is installed and runs on the device.
* ``eager``       the plain reference math (explicit matmul + softmax) in the input dtype.

Each provider has ``status(device, dtype)`` (None when it can run, else what to print)
and ``build(case)`` returning a zero-argument callable whose result is (B, N, H, D).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from instantstyle.kernels import (
    decoupled_attention,
    normalize_inputs,
    reference_decoupled_attention,
)

from .shapes import Shape

NOT_TIMED_NO_GPU = "not timed (no GPU)"


@dataclass
class KernelCase:
    """One random input set for a shape (never zeros: the benchmark must see real data)."""

    shape: Shape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ip_k: List[torch.Tensor]
    ip_v: List[torch.Tensor]
    scales: List[float]

    @property
    def nbytes(self) -> int:
        ts = [self.q, self.k, self.v, *self.ip_k, *self.ip_v]
        return sum(t.numel() * t.element_size() for t in ts) + self.q.numel() * self.q.element_size()  # + output


def make_case(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> KernelCase:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    B, N, H, D = shape.B, shape.N, shape.H, shape.D
    return KernelCase(
        shape=shape,
        q=rand(B, N, H, D),
        k=rand(B, shape.Lt, H, D),
        v=rand(B, shape.Lt, H, D),
        ip_k=[rand(B, L, H, D) for L in shape.ip_tokens],
        ip_v=[rand(B, L, H, D) for L in shape.ip_tokens],
        scales=[1.0 if i == 0 else 0.5 for i in range(len(shape.ip_tokens))],
    )


# --------------------------------------------------------------------------- implementations


def diffusers_math(q, k, v, ip_k, ip_v, scales):
    """diffusers' IPAdapterAttnProcessor2_0.__call__ after the projections, unchanged.

    ``q``, ``k``, ``v`` arrive as ``to_q(x).view(B, -1, H, D)`` would, i.e. (B, N, H, D).
    """
    batch_size, _, heads, head_dim = q.shape
    query = q.transpose(1, 2)
    key = k.transpose(1, 2)
    value = v.transpose(1, 2)
    hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    for current_k, current_v, scale in zip(ip_k, ip_v, scales):
        ip_key = current_k.transpose(1, 2)
        ip_value = current_v.transpose(1, 2)
        current_ip_hidden_states = F.scaled_dot_product_attention(
            query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False
        )
        current_ip_hidden_states = current_ip_hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
        current_ip_hidden_states = current_ip_hidden_states.to(query.dtype)
        hidden_states = hidden_states + scale * current_ip_hidden_states
    return hidden_states.view(batch_size, -1, heads, head_dim)


def xformers_math(q, k, v, ip_k, ip_v, scales):
    """diffusers' math with xformers' attention, which takes (B, N, H, D) directly."""
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q, k, v)
    for ik, iv, scale in zip(ip_k, ip_v, scales):
        out = out + scale * xops.memory_efficient_attention(q, ik, iv)
    return out


# --------------------------------------------------------------------------- providers


@dataclass
class Provider:
    name: str
    description: str
    build: Callable[[KernelCase], Callable[[], torch.Tensor]]
    status: Callable[[torch.device, torch.dtype, Shape], Optional[str]]
    baseline: bool = False


def _always(device, dtype, shape) -> Optional[str]:
    return None


def _triton_status(device, dtype, shape) -> Optional[str]:
    if device.type != "cuda":
        return NOT_TIMED_NO_GPU
    from instantstyle.kernels import explain_dispatch

    tiny = make_case(shape.__class__("probe", 1, 1, shape.H, shape.D, 1, shape.ip_tokens[:1]), dtype, device)
    try:
        explain_dispatch(tiny.q, tiny.k, tiny.v, tiny.ip_k, tiny.ip_v, backend="triton")
    except (ValueError, TypeError) as exc:
        return f"unsupported: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def xformers_problem(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """None when xformers is installed and a tiny call works, else a short reason ("absent ...")."""
    try:
        import xformers.ops as xops
    except Exception as exc:  # ImportError, or a broken build raising at import
        return "absent" if isinstance(exc, ModuleNotFoundError) else f"absent (import failed: {exc})"
    try:
        t = torch.randn(1, 8, 1, 64, device=device_type, dtype=dtype)
        xops.memory_efficient_attention(t, t, t)
    except Exception as exc:
        return f"absent (fails on {device_type}/{str(dtype).replace('torch.', '')}: {type(exc).__name__})"
    return None


def _xformers_status(device, dtype, shape) -> Optional[str]:
    return xformers_problem(device.type, dtype)


def _build_diffusers(c: KernelCase):
    return lambda: diffusers_math(c.q, c.k, c.v, c.ip_k, c.ip_v, c.scales)


def _build_ours(backend: str):
    def build(c: KernelCase):
        return lambda: decoupled_attention(c.q, c.k, c.v, c.ip_k, c.ip_v, ip_scale=list(c.scales), backend=backend)

    return build


def _build_xformers(c: KernelCase):
    return lambda: xformers_math(c.q, c.k, c.v, c.ip_k, c.ip_v, c.scales)


def _build_eager(c: KernelCase):
    inputs = normalize_inputs(c.q, c.k, c.v, c.ip_k, c.ip_v, list(c.scales))
    return lambda: reference_decoupled_attention(inputs, dtype=c.q.dtype)


KERNEL_PROVIDERS: List[Provider] = [
    Provider("diffusers", "diffusers' math: 2 SDPA calls, transposes, scale, add", _build_diffusers, _always, baseline=True),
    Provider("ours-triton", "instantstyle op, fused Triton kernel", _build_ours("triton"), _triton_status),
    Provider("ours-torch", "instantstyle op, torch backend", _build_ours("torch"), _always),
    Provider("xformers", "diffusers' math on xformers memory_efficient_attention", _build_xformers, _xformers_status),
    Provider("eager", "plain reference math (matmul + softmax) in the input dtype", _build_eager, _always),
]


def provider_names() -> List[str]:
    return [p.name for p in KERNEL_PROVIDERS]


def select(names: Sequence[str] = ()) -> List[Provider]:
    """Providers in catalogue order; ``names`` filters them (the baseline is always kept)."""
    return [p for p in KERNEL_PROVIDERS if not names or p.name in names or p.baseline]


def reference_output(case: KernelCase) -> torch.Tensor:
    """Float64 ground truth for the error column."""
    inputs = normalize_inputs(case.q, case.k, case.v, case.ip_k, case.ip_v, list(case.scales))
    return reference_decoupled_attention(inputs)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.reshape(ref.shape).to(torch.float64)
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
