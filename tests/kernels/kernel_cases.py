"""Random inputs for the decoupled-attention tests, including awkward layouts."""
from __future__ import annotations

import torch


def rand_bnhd(B, L, H, D, dtype, layout="contiguous"):
    """A (B, L, H, D) tensor with unit-variance values in one of several memory layouts.

    - ``contiguous``: plain.
    - ``heads_first``: a (B, H, L, D) buffer seen through ``transpose(1, 2)``.
    - ``slice``: the middle third of a fused (B, L, H, 3D) projection, as from a packed QKV
      linear layer (row stride 3*D, offset D).
    All keep the last dim contiguous, which is what the fast path needs.
    """
    if layout == "contiguous":
        return torch.randn(B, L, H, D, dtype=dtype)
    if layout == "heads_first":
        return torch.randn(B, H, L, D, dtype=dtype).transpose(1, 2)
    if layout == "slice":
        return torch.randn(B, L, H, 3 * D, dtype=dtype)[..., D : 2 * D]
    raise ValueError(layout)


def make_case(B, N, H, D, Lt, ip_lens, dtype, layout="contiguous", scales=None, masks=False, bias=None, joint=0, joint_bias=None):
    """Keyword arguments for ``decoupled_attention`` with random content."""
    q = rand_bnhd(B, N, H, D, dtype, layout)
    k = rand_bnhd(B, Lt, H, D, dtype, layout)
    v = rand_bnhd(B, Lt, H, D, dtype, layout)
    ip_k = [rand_bnhd(B, L, H, D, dtype, layout) for L in ip_lens]
    ip_v = [rand_bnhd(B, L, H, D, dtype, layout) for L in ip_lens]
    if scales is None:
        scales = [0.5 + i for i in range(len(ip_lens))]
    kwargs = dict(q=q, k=k, v=v, ip_k=ip_k, ip_v=ip_v, ip_scale=scales)
    if masks:
        # every other stream masked with soft weights; the rest unmasked (None)
        kwargs["ip_mask"] = [torch.rand(B, N) if i % 2 == 0 else None for i in range(len(ip_lens))]
    if bias == "bool":
        keep = torch.rand(B, Lt) > 0.3
        keep[:, 0] = True
        kwargs["text_bias"] = keep
    elif bias == "additive":
        kwargs["text_bias"] = torch.randn(B, Lt)
    if joint:  # reference tokens that join the text softmax (StyleAligned-style)
        kwargs["joint_k"] = rand_bnhd(B, joint, H, D, dtype, layout)
        kwargs["joint_v"] = rand_bnhd(B, joint, H, D, dtype, layout)
        if joint_bias == "additive":
            kwargs["joint_bias"] = torch.randn(B, joint) + 0.5
        elif joint_bias == "bool":
            kwargs["joint_bias"] = torch.rand(B, joint) > 0.5
    return kwargs
