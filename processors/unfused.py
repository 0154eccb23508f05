"""The correct unfused path, for inputs the fused op can't take.

Today that is an attention mask that varies per head or per query: the op's text
bias is one value per key.  Same math as the op, one SDPA call per softmax, with the
mask applied to the text softmax only (as diffusers does).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def unfused_decoupled_attention(q, k, v, streams: Sequence, attn_mask: torch.Tensor) -> torch.Tensor:
    """``(B, N, H, D)`` tensors and ``streams`` of ``(ip_k, ip_v, scale, mask)`` -> ``(B, N, H, D)``.

    ``scale`` is a 0-D or ``(B,)`` tensor, ``mask`` None or ``(B, N)``; ``attn_mask``
    broadcasts to ``(B, H, N, Lt)``.
    """
    heads_first = lambda t: t.transpose(1, 2)  # noqa: E731
    qh = heads_first(q)
    if attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)  # SDPA wants an additive mask in q's dtype
    out = F.scaled_dot_product_attention(qh, heads_first(k), heads_first(v), attn_mask=attn_mask)
    for ip_k, ip_v, scale, mask in streams:
        ip_out = F.scaled_dot_product_attention(qh, heads_first(ip_k), heads_first(ip_v))
        weight = scale.to(q.dtype).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        if mask is not None:
            weight = weight * mask.to(q.dtype)[:, None, :, None]
        out = out + weight * ip_out
    return heads_first(out)
