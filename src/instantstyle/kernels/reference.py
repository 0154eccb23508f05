"""Readable float64 reference of decoupled cross-attention.

    out[b, n, h] = softmax(q [k; k_joint]^T * sm_scale + [text_bias; joint_bias]) [v; v_joint]
                 + sum_i  scale_i[b] * mask_i[b, n] * softmax(q k_i^T * sm_scale) v_i

Written as plainly as possible (explicit matmul and softmax, no SDPA) so that it can
serve as the ground truth that every backend is tested against.
"""
from __future__ import annotations

import torch

from .inputs import AttentionInputs


def _softmax_attention(q, k, v, sm_scale, bias=None):
    """(B, N, H, D) x (B, L, H, D) -> (B, N, H, D), one softmax over the L keys."""
    logits = torch.einsum("bnhd,blhd->bhnl", q, k) * sm_scale
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    # Rows whose keys are all masked give 0, as SDPA does, instead of NaN.
    all_masked = torch.isneginf(logits).all(dim=-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(all_masked, 0.0), dim=-1).masked_fill(all_masked, 0.0)
    return torch.einsum("bhnl,blhd->bnhd", probs, v)


def reference_decoupled_attention(inputs: AttentionInputs, dtype=torch.float64) -> torch.Tensor:
    """Compute the op in ``dtype`` (float64 by default) from checked inputs."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    k, v, bias = inputs.joint_softmax_keys()
    q, k, v = cast(inputs.q), cast(k), cast(v)
    out = _softmax_attention(q, k, v, inputs.sm_scale, cast(bias))
    for i, (ik, iv) in enumerate(zip(inputs.ip_k, inputs.ip_v)):
        weight = cast(inputs.ip_scale[i])[:, None]  # (B, 1)
        if inputs.ip_mask is not None:
            weight = weight * cast(inputs.ip_mask[i])  # (B, N)
        out = out + weight[:, :, None, None] * _softmax_attention(q, cast(ik), cast(iv), inputs.sm_scale)
    return out
