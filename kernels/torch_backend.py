"""Pure-PyTorch backend: runs on any device and supports autograd.

It is diffusers' math (one SDPA call per softmax) minus its overheads: queries are
handed to SDPA as a transposed *view*, SDPA's output already has the (B, N, H, D)
memory layout, and the IP terms are accumulated in place into that output instead of
materialising ``scale * ip_out`` and a fresh sum for every stream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import AttentionInputs


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # (B, L, H, D) -> (B, H, L, D), a view


def torch_decoupled_attention(inputs: AttentionInputs) -> torch.Tensor:
    q = _heads_first(inputs.q)
    k, v, bias = inputs.joint_softmax_keys()
    if bias is not None:
        bias = bias[:, None, None, :].to(q.dtype)  # (B, 1, 1, Lt + Lj)
    out = F.scaled_dot_product_attention(q, _heads_first(k), _heads_first(v), attn_mask=bias, scale=inputs.sm_scale)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in inputs.tensors)
    if differentiable:
        out = out.clone()  # SDPA's output is saved for backward; never add into it in place
    for i, (ik, iv) in enumerate(zip(inputs.ip_k, inputs.ip_v)):
        ip_out = F.scaled_dot_product_attention(q, _heads_first(ik), _heads_first(iv), scale=inputs.sm_scale)
        weight = inputs.ip_scale[i].to(q.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        if inputs.ip_mask is not None:
            weight = weight * inputs.ip_mask[i].to(q.dtype)[:, None, :, None]  # (B, 1, N, 1)
        if differentiable:
            out = out + weight * ip_out
        else:
            out.addcmul_(ip_out, weight)
    # (B, H, N, D) -> (B, N, H, D); free when SDPA returned a heads-second layout.
    return _heads_first(out).contiguous()
