"""Random inputs for the decoupled-attention tests, including awkward layouts, and the shape cases
every backend is checked on (the interpreter on CPU, the compiled kernel on a GPU)."""
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


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (id, B, N, H, D, Lt, ip_lens, extras)
CASES = [
    ("sdxl_like", 2, 96, 2, 64, 77, (4,), {}),
    ("sd15_d40", 2, 70, 2, 40, 77, (4,), {}),
    ("sd15_d80_plus", 1, 33, 2, 80, 77, (16,), {}),
    ("sd15_d160", 1, 20, 1, 160, 77, (4,), {}),
    ("d256", 1, 17, 1, 256, 40, (4,), {}),
    ("d8_tiny", 2, 5, 3, 8, 3, (1,), {}),
    ("n1", 2, 1, 2, 64, 77, (4,), {}),
    ("long_prompt_231", 1, 65, 2, 64, 231, (4,), {}),
    ("lt512_full_face_257", 1, 40, 1, 64, 512, (257,), {}),
    ("lt1", 1, 30, 2, 32, 1, (4,), {}),
    ("no_streams", 2, 50, 2, 64, 77, (), {}),
    ("two_adapters_masked", 2, 64, 2, 64, 77, (4, 16), {"masks": True}),
    ("eight_streams", 1, 30, 1, 64, 20, (4, 16, 1, 4, 33, 4, 16, 4), {"masks": True}),
    ("bool_text_bias", 2, 40, 2, 64, 154, (4,), {"bias": "bool"}),
    ("additive_text_bias", 2, 40, 2, 40, 77, (16,), {"bias": "additive"}),
    ("heads_first_views", 2, 70, 2, 64, 77, (4, 257), {"layout": "heads_first"}),
    ("packed_qkv_slices", 2, 50, 2, 80, 77, (4,), {"layout": "slice"}),
    ("per_sample_scales", 3, 40, 2, 64, 77, (4, 16), {"scales": "per_sample"}),
    ("joint_self_attention_keys", 2, 70, 2, 64, 70, (), {"joint": 70}),
    ("joint_keys_with_logit_bias_and_ip", 2, 40, 2, 40, 77, (4,), {"joint": 130, "joint_bias": "additive", "bias": "bool"}),
    ("joint_bool_bias_views", 1, 33, 2, 80, 20, (16,), {"joint": 9, "joint_bias": "bool", "layout": "heads_first"}),
]


def case_kwargs(case, dtype):
    """``decoupled_attention`` keyword arguments for one of ``CASES`` in ``dtype``."""
    _, B, N, H, D, Lt, ip_lens, extras = case
    extras = dict(extras)
    if extras.get("scales") == "per_sample":
        # includes a sample whose scale is 0 for one stream: the kernel's skip branch
        extras["scales"] = [torch.tensor([0.0, 0.7, 1.5]), torch.tensor([1.0, 0.0, -0.5])]
    return make_case(B, N, H, D, Lt, ip_lens, dtype, **extras)
