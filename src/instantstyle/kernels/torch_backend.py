"""Pure-PyTorch backend: runs on any device, supports autograd, and is the ONE unfused
implementation of the op's math (the processors' fallbacks and observers use it too).

It is diffusers' math (one SDPA call per softmax) minus its overheads: queries are
handed to SDPA as a transposed *view*, SDPA's output already has the (B, N, H, D)
memory layout, and the IP terms are accumulated in place instead of materialising
``scale * ip_out`` and a fresh sum for every stream.

Precision, as in the Triton kernel: biases are applied and scales multiplied in the
accumulation dtype (fp32, fp64 for fp64 inputs), never rounded to fp16/bf16 first.
SDPA wants its mask in q's dtype, so the bias is shifted by its row maximum before
the cast: softmax is shift-invariant, and the keys that carry the weight then sit
near 0, where fp16/bf16 are exact enough (a bf16 bias of ~300 would otherwise be off
by up to 1, an e-fold error in the probabilities).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .inputs import AttentionInputs, additive_bias


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # (B, L, H, D) -> (B, H, L, D), a view


def first_softmax_bias(inputs: AttentionInputs, attn_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Additive bias of the first softmax, ``(B|1, H|1, N|1, Lt + Lj)`` in the accumulation
    dtype, or None.  ``attn_mask`` (broadcastable to ``(B, H, N, Lt)``) replaces
    ``text_bias``: the per-head / per-query masks the fused kernel can't take."""
    wide = inputs.ip_scale.dtype
    text = additive_bias(attn_mask, wide) if attn_mask is not None else None
    if text is None and inputs.text_bias is not None:
        text = inputs.text_bias[:, None, None, :]
    if inputs.joint_k is None:
        return text
    joint = inputs.joint_bias[:, None, None, :] if inputs.joint_bias is not None else None
    if text is None and joint is None:
        return None
    B, N, H, _ = inputs.shape
    lt, lj = inputs.k.shape[1], inputs.joint_k.shape[1]
    text = text if text is not None else torch.zeros((1, 1, 1, lt), dtype=wide, device=inputs.q.device)
    joint = joint if joint is not None else torch.zeros((1, 1, 1, lj), dtype=wide, device=inputs.q.device)
    lead = torch.broadcast_shapes(text.shape[:3], joint.shape[:3])
    return torch.cat([text.expand(*lead, lt), joint.expand(*lead, lj)], dim=-1)


def _sdpa_mask(bias: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``bias`` in q's dtype for SDPA, shifted by its (finite) row maximum first."""
    if bias is None or bias.dtype == dtype:
        return bias
    top = bias.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # fully masked rows stay -inf
    return (bias - top).to(dtype)


def torch_decoupled_attention(inputs: AttentionInputs, attn_mask: Optional[torch.Tensor] = None, keep_probs: bool = False):
    """The op on ``inputs``: ``(B, N, H, D)`` contiguous, in q's dtype.

    ``attn_mask``: optional mask broadcastable to ``(B, H, N, Lt)`` (bool, True = attend,
    or additive) used instead of ``text_bias``.  ``keep_probs``: also return the first
    softmax's probabilities ``(B, H, N, Lt + Lj)`` in at least fp32, as ``(out, probs)``.
    """
    q = _heads_first(inputs.q)
    k, v, _ = inputs.joint_softmax_keys()
    bias = first_softmax_bias(inputs, attn_mask)
    wide = inputs.ip_scale.dtype
    probs = None
    if keep_probs:
        logits = q.to(wide) @ _heads_first(k).to(wide).transpose(-1, -2) * inputs.sm_scale
        if bias is not None:
            logits = logits + bias
        probs = torch.nan_to_num(logits.softmax(-1), nan=0.0)  # fully masked rows give 0, as SDPA
        out = probs @ _heads_first(v).to(wide)
    else:
        out = F.scaled_dot_product_attention(q, _heads_first(k), _heads_first(v), attn_mask=_sdpa_mask(bias, q.dtype), scale=inputs.sm_scale)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in inputs.tensors)
    if inputs.ip_k:
        out = out.to(wide) if out.dtype != wide else (out.clone() if differentiable else out)
    for i, (ik, iv) in enumerate(zip(inputs.ip_k, inputs.ip_v)):
        ip_out = F.scaled_dot_product_attention(q, _heads_first(ik), _heads_first(iv), scale=inputs.sm_scale)
        weight = inputs.ip_scale[i].view(-1, 1, 1, 1)  # (B, 1, 1, 1), accumulation dtype
        if inputs.ip_mask is not None:
            weight = weight * inputs.ip_mask[i][:, None, :, None]  # (B, 1, N, 1)
        if differentiable:
            out = out + weight * ip_out  # SDPA's output is saved for backward: never in place
        else:
            out.addcmul_(ip_out, weight)
    # (B, H, N, D) -> (B, N, H, D); free when SDPA returned a heads-second layout.
    if out.dtype != inputs.q.dtype:
        out = out.to(inputs.q.dtype)
    out = _heads_first(out).contiguous()
    return (out, probs) if keep_probs else out
