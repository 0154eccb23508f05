"""The public op, registered with ``torch.library`` so ``torch.compile`` traces it.

Argument checking and normalisation run in Python *before* the custom op, where
dynamo can trace them; the op itself takes only canonical tensors, so scales arrive
as tensor values and changing them never recompiles a graph.

Training: the op has an autograd formula (``register_autograd``) whose backward is a
second custom op, ``instantstyle::decoupled_attention_backward``, so ``torch.compile``
traces forward and backward alike (a backward that launched kernels itself could not be
traced).  Both pick their backend the same way; the formulas are in :mod:`.backward`.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .backward import GradNeeds, Grads, torch_decoupled_attention_backward
from .dispatch import _needs_grad, choose_backend, default_backend
from .inputs import AttentionInputs, normalize_inputs
from .torch_backend import torch_decoupled_attention


def _run_triton(inputs: AttentionInputs) -> torch.Tensor:
    from .triton_decoupled import (
        triton_decoupled_attention,  # imported only where Triton exists
    )

    return triton_decoupled_attention(inputs)


def _run_triton_backward(inputs: AttentionInputs, dout: torch.Tensor, needs: GradNeeds) -> Grads:
    from .triton_bwd_launch import triton_decoupled_attention_backward

    return triton_decoupled_attention_backward(inputs, dout, needs)


RUNNERS = {"triton": _run_triton, "torch": torch_decoupled_attention}
BACKWARD_RUNNERS = {"triton": _run_triton_backward, "torch": torch_decoupled_attention_backward}


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


# --------------------------------------------------------------------------- backward


def _grad_slots(q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, joint_k, joint_v, joint_bias, needs: GradNeeds):
    """(input, needed) in the backward op's output order; a custom op returns tensors
    only, so a gradient that is not needed comes back as an empty placeholder."""
    S = len(ip_k)
    return [(q, needs.q), (k, needs.kv), (v, needs.kv),
            *[(t, needs.ip_kv_of(s)) for s, t in enumerate(ip_k)], *[(t, needs.ip_kv_of(s)) for s, t in enumerate(ip_v)],
            (ip_scale, needs.ip_scale and S > 0), (ip_mask, needs.ip_mask and ip_mask is not None),
            (text_bias, needs.text_bias and text_bias is not None),
            (joint_k, needs.joint_kv and joint_k is not None), (joint_v, needs.joint_kv and joint_k is not None),
            (joint_bias, needs.joint_bias and joint_bias is not None)]


@torch.library.custom_op("instantstyle::decoupled_attention_backward", mutates_args=())
def decoupled_attention_backward_op(
    dout: torch.Tensor,
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
    joint_k: Optional[torch.Tensor],
    joint_v: Optional[torch.Tensor],
    joint_bias: Optional[torch.Tensor],
    needs: List[bool],
) -> List[torch.Tensor]:
    inputs = AttentionInputs(q, k, v, tuple(ip_k), tuple(ip_v), ip_scale, ip_mask, text_bias, sm_scale, joint_k, joint_v, joint_bias)
    flags = GradNeeds.from_list(needs)
    g = BACKWARD_RUNNERS[choose_backend(inputs, backend).backend](inputs, dout, flags)
    found = [g.q, g.k, g.v, *g.ip_k, *g.ip_v, g.ip_scale, g.ip_mask, g.text_bias, g.joint_k, g.joint_v, g.joint_bias]
    slots = _grad_slots(q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, joint_k, joint_v, joint_bias, flags)
    return [grad if need else q.new_empty(0) for grad, (_, need) in zip(found, slots)]


@decoupled_attention_backward_op.register_fake
def _decoupled_attention_backward_fake(dout, q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, sm_scale, backend,
                                       joint_k, joint_v, joint_bias, needs):
    slots = _grad_slots(q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, joint_k, joint_v, joint_bias,
                        GradNeeds.from_list(needs))
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) if need else q.new_empty(0) for t, need in slots]


_NUM_ARGS = 13  # of decoupled_attention_op


def _setup_context(ctx, inputs, output):
    inputs = tuple(inputs) + (None,) * (_NUM_ARGS - len(inputs))
    q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, sm_scale, backend, joint_k, joint_v, joint_bias = inputs
    rg = lambda t: t is not None and t.requires_grad  # noqa: E731
    ctx.needs = GradNeeds(
        q=rg(q), kv=rg(k) or rg(v), ip_kv=tuple(rg(a) or rg(b) for a, b in zip(ip_k, ip_v)), ip_scale=rg(ip_scale),
        ip_mask=rg(ip_mask), text_bias=rg(text_bias), joint_kv=rg(joint_k) or rg(joint_v), joint_bias=rg(joint_bias),
    )
    ctx.sm_scale, ctx.backend, ctx.num_streams = sm_scale, backend, len(ip_k)
    ctx.save_for_backward(q, k, v, ip_scale, ip_mask, text_bias, joint_k, joint_v, joint_bias, *ip_k, *ip_v)


def _backward(ctx, dout):
    q, k, v, ip_scale, ip_mask, text_bias, joint_k, joint_v, joint_bias, *ip = ctx.saved_tensors
    S = ctx.num_streams
    ip_k, ip_v = list(ip[:S]), list(ip[S:])
    flat = torch.ops.instantstyle.decoupled_attention_backward(
        dout, q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, ctx.sm_scale, ctx.backend, joint_k, joint_v, joint_bias,
        ctx.needs.as_list(),
    )
    slots = _grad_slots(q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, joint_k, joint_v, joint_bias, ctx.needs)
    grads = [g if need else None for g, (_, need) in zip(flat, slots)]
    dq, dk, dv = grads[:3]
    d_ip_k, d_ip_v = grads[3:3 + S], grads[3 + S:3 + 2 * S]
    d_scale, d_mask, d_bias, d_jk, d_jv, d_jb = grads[3 + 2 * S:]
    # The dispatcher may drop trailing arguments left at their defaults (the joint keys);
    # needs_input_grad has the structure of the arguments that arrived: match it.
    return (dq, dk, dv, d_ip_k, d_ip_v, d_scale, d_mask, d_bias, None, None, d_jk, d_jv, d_jb)[:len(ctx.needs_input_grad)]


torch.library.register_autograd("instantstyle::decoupled_attention", _backward, setup_context=_setup_context)


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
    if not torch.compiler.is_compiling():
        chosen = choose_backend(inputs, backend).backend
        # Eager: call the backend directly.  The custom op exists so that graphs can trace
        # it; its Python dispatch costs ~25 us a call, as much as a whole launch-bound layer.
        # With grad, the torch backend stays composite too (autograd through SDPA uses its
        # fused backward kernels); the Triton forward needs the op's autograd formula.
        if chosen == "torch" or not _needs_grad(inputs):
            return RUNNERS[chosen](inputs)
    return torch.ops.instantstyle.decoupled_attention(
        inputs.q, inputs.k, inputs.v, list(inputs.ip_k), list(inputs.ip_v),
        inputs.ip_scale, inputs.ip_mask, inputs.text_bias, inputs.sm_scale, backend,
        inputs.joint_k, inputs.joint_v, inputs.joint_bias,
    )
