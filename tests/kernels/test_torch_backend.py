"""The torch backend (the one unfused implementation): biases and scales applied in the
accumulation dtype, per-head/per-query masks, kept probabilities, processor-built inputs."""
from __future__ import annotations

import pytest
import torch

from instantstyle.kernels import check_close, normalize_inputs, processor_inputs, reference_decoupled_attention
from instantstyle.kernels.torch_backend import torch_decoupled_attention


def _qkv(dtype, B=2, N=33, H=3, D=16, Lt=19, L=4):
    q = torch.randn(B, N, H, D).to(dtype)
    k, v = (torch.randn(B, Lt, H, D).to(dtype) for _ in range(2))
    ik, iv = (torch.randn(B, L, H, D).to(dtype) for _ in range(2))
    return q, k, v, ik, iv


@pytest.mark.parametrize("dtype, precision", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_large_biases_are_applied_in_fp32(dtype, precision):
    q, k, v, ik, iv = _qkv(dtype)
    bias = 256 + 44 * torch.rand(2, 19)  # around 256-300: bf16 steps there are 1.0 (an e-fold error)
    inputs = normalize_inputs(q, k, v, [ik], [iv], 0.7, text_bias=bias)
    check_close(torch_decoupled_attention(inputs), reference_decoupled_attention(inputs), precision)


def test_huge_scales_do_not_overflow_fp16():
    q, k, v, ik, iv = _qkv(torch.float16)
    v, iv = v * 1e-3, iv * 1e-3  # the result fits fp16; the rounded scale (7e4 -> inf) must not be used
    inputs = normalize_inputs(q, k, v, [ik], [iv], 7e4)
    out = torch_decoupled_attention(inputs)
    assert torch.isfinite(out).all()
    check_close(out, reference_decoupled_attention(inputs), "fp16")


@pytest.mark.parametrize("shape", [(2, 3, 33, 19), (2, 1, 33, 19), (1, 3, 1, 19)])
def test_full_masks_and_kept_probabilities_match_an_explicit_softmax(shape):
    q, k, v, ik, iv = (t.double() for t in _qkv(torch.float32))
    mask = torch.rand(shape) > 0.3
    mask[..., 0] = True
    inputs = normalize_inputs(q, k, v, [ik], [iv], 0.5)
    out, probs = torch_decoupled_attention(inputs, attn_mask=mask, keep_probs=True)
    logits = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * 16 ** -0.5
    expected_probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    check_close(probs, expected_probs, "fp64")
    ip = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), ik.transpose(1, 2), iv.transpose(1, 2))
    expected = (expected_probs @ v.transpose(1, 2) + 0.5 * ip).transpose(1, 2)
    check_close(out, expected, "fp64")
    check_close(torch_decoupled_attention(inputs, attn_mask=mask), expected, "fp64")  # the SDPA route agrees


@pytest.mark.parametrize("streams", [0, 1, 3])
def test_processor_inputs_equal_checked_inputs(streams):
    q, k, v, ik, iv = _qkv(torch.float32)
    scales = [torch.tensor(0.25 * (i + 1)) for i in range(streams)]
    bias = torch.rand(2, 19) > 0.2
    fast = processor_inputs(q, k, v, [ik] * streams, [iv] * streams, scales, bias)
    checked = normalize_inputs(q, k, v, [ik] * streams, [iv] * streams, scales, text_bias=bias)
    assert torch.equal(fast.ip_scale, checked.ip_scale) and torch.equal(fast.text_bias, checked.text_bias)
    check_close(torch_decoupled_attention(fast), reference_decoupled_attention(checked), "fp32")
