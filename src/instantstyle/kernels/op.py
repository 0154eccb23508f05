"""The public op, registered with ``torch.library`` so ``torch.compile`` traces it.

Argument checking and normalisation run in Python *before* the custom op, where
dynamo can trace them; the op itself takes only canonical tensors, so scales arrive
as tensor values and changing them never recompiles a graph.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .dispatch import _needs_grad, choose_backend, default_backend
from .inputs import AttentionInputs, normalize_inputs
from .torch_backend import torch_decoupled_attention


def _run_triton(inputs: AttentionInputs) -> torch.Tensor:
    from .triton_decoupled import (
        triton_decoupled_attention,  # imported only where Triton exists
    )

    return triton_decoupled_attention(inputs)


RUNNERS = {"triton": _run_triton, "torch": torch_decoupled_attention}


@torch.library.custom_op("instantstyle::decoupled_attention", mutates_args=())
def decoupled_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ip_k: List[torch.Tensor],
    ip_v: List[torch.Tensor],
    ip_scale: torch.Tensor,
    ip_mask: Optional[torch.Tensor],
    text_bias: Optional[torch.Tensor],
    sm_scale: float,
    backend: str,
    joint_k: Optional[torch.Tensor] = None,
    joint_v: Optional[torch.Tensor] = None,
    joint_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    inputs = AttentionInputs(q, k, v, tuple(ip_k), tuple(ip_v), ip_scale, ip_mask, text_bias, sm_scale, joint_k, joint_v, joint_bias)
    return RUNNERS[choose_backend(inputs, backend).backend](inputs)


@decoupled_attention_op.register_fake
def _decoupled_attention_fake(q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, sm_scale, backend, joint_k=None, joint_v=None, joint_bias=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous (B, N, H, D)


def decoupled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ip_k=(),
    ip_v=(),
    ip_scale=1.0,
    ip_mask=None,
    text_bias=None,
    sm_scale: Optional[float] = None,
    backend: Optional[str] = None,
    *,
    joint_k: Optional[torch.Tensor] = None,
    joint_v: Optional[torch.Tensor] = None,
    joint_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decoupled cross-attention, the math of diffusers' ``IPAdapterAttnProcessor2_0``::

        out = softmax(q [k; joint_k]^T * sm_scale + [text_bias; joint_bias]) [v; joint_v]
            + sum_i scale_i[b] * mask_i[b, n] * softmax(q k_i^T * sm_scale) v_i

    Args:
        q: ``(B, N, H, D)`` queries, e.g. ``to_q(x).view(B, N, H, D)`` (no copy needed).
        k, v: ``(B, Lt, H, D)`` text keys and values.
        ip_k, ip_v: sequences with one ``(B, L_i, H, D)`` tensor per IP stream (may be empty).
        ip_scale: per stream a float or a ``(B,)`` tensor; a single value applies to all
            streams.  Streams whose scale is the number 0 are skipped.
        ip_mask: None, or per stream None or ``(B, N)`` weights on the queries.
        text_bias: optional ``(B, Lt)`` key-padding bias: bool (True = attend) or additive.
        sm_scale: softmax scale, ``D ** -0.5`` by default.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; see :func:`explain_dispatch`.  None
            (the default) follows :func:`use_backend`, which defaults to ``"auto"``.
        joint_k, joint_v: optional ``(B, Lj, H, D)`` keys/values that join the FIRST softmax
            next to the text keys (StyleAligned's shared reference tokens, SD3-style joint
            IP keys); the fused kernel walks them without concatenating.
        joint_bias: optional ``(B, Lj)`` logit bias on the joint keys (bool or additive).

    Returns:
        ``(B, N, H, D)`` in q's dtype, contiguous, so ``.view(B, N, H * D)`` is free.
    """
    inputs = normalize_inputs(q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, sm_scale, joint_k, joint_v, joint_bias)
    return run_inputs(inputs, backend)


def run_inputs(inputs: AttentionInputs, backend: Optional[str] = None) -> torch.Tensor:
    """The op on already canonical :class:`AttentionInputs` (``normalize_inputs``, or
    ``processor_inputs`` for what a processor built itself): backend choice and run."""
    backend = default_backend() if backend is None else backend
    if _needs_grad(inputs):
        # Custom ops have no autograd formula here; the composite torch path does.
        choose_backend(inputs, "torch" if backend == "auto" else backend)  # explicit triton -> clear error
        return torch_decoupled_attention(inputs)
    if not torch.compiler.is_compiling():
        # Eager: call the backend directly.  The custom op exists so that graphs can trace
        # it; its Python dispatch costs ~25 us a call, as much as a whole launch-bound layer.
        return RUNNERS[choose_backend(inputs, backend).backend](inputs)
    return torch.ops.instantstyle.decoupled_attention(
        inputs.q, inputs.k, inputs.v, list(inputs.ip_k), list(inputs.ip_v),
        inputs.ip_scale, inputs.ip_mask, inputs.text_bias, inputs.sm_scale, backend,
        inputs.joint_k, inputs.joint_v, inputs.joint_bias,
    )
