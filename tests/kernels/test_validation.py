"""Bad input gets a ValueError/TypeError naming the argument, the expectation and what came."""
import pytest
import torch

from instantstyle.kernels import decoupled_attention

from helpers.kernel_cases import make_case


def _good(**over):
    kwargs = make_case(2, 8, 2, 16, 5, (4,), torch.float32)
    kwargs.update(over)
    return kwargs


@pytest.mark.parametrize(
    "over, exc, pattern",
    [
        (dict(q=torch.randn(2, 8, 32)), ValueError, r"q: expected a 4-D tensor \(B, N, H, D\), got shape \(2, 8, 32\)"),
        (dict(q=[1.0]), TypeError, r"q: expected a torch.Tensor, got list"),
        (dict(q=torch.randint(0, 3, (2, 8, 2, 16))), TypeError, r"q: expected dtype .*got torch.int64"),
        (dict(k=torch.randn(3, 5, 2, 16)), ValueError, r"k: expected shape \(B, Lt, H, D\) = \(2, \*, 2, 16\), got \(3, 5, 2, 16\)"),
        (dict(k=torch.randn(2, 5, 4, 16)), ValueError, r"k: expected .* = \(2, \*, 2, 16\), got \(2, 5, 4, 16\)"),
        (dict(v=torch.randn(2, 6, 2, 16)), ValueError, r"v: expected shape \(B, Lt, H, D\) = \(2, 5, 2, 16\), got \(2, 6, 2, 16\)"),
        (dict(k=torch.randn(2, 0, 2, 16), v=torch.randn(2, 0, 2, 16)), ValueError, r"k: expected at least one text token"),
        (dict(k=torch.randn(2, 5, 2, 16, dtype=torch.float16)), TypeError, r"k: expected dtype torch.float32 \(q's dtype\), got torch.float16"),
        (dict(k=torch.randn(2, 5, 2, 16, device="meta")), ValueError, r"k: expected device cpu \(q's device\), got meta"),
        (dict(ip_k=torch.randn(2, 4, 2, 16)), TypeError, r"ip_k: expected a sequence with one tensor per IP stream, got a single tensor"),
        (dict(ip_v=[]), ValueError, r"ip_v: expected one tensor per ip_k stream \(1\), got 0"),
        (dict(ip_k=[torch.randn(2, 4, 2, 8)]), ValueError, r"ip_k\[0\]: expected shape \(B, L_i, H, D\) = \(2, \*, 2, 16\), got \(2, 4, 2, 8\)"),
        (dict(ip_v=[torch.randn(2, 3, 2, 16)]), ValueError, r"ip_v\[0\]: expected shape .* = \(2, 4, 2, 16\), got \(2, 3, 2, 16\)"),
        (dict(ip_scale=[1.0, 2.0]), ValueError, r"ip_scale: expected one scale per IP stream \(1\), got 2"),
        (dict(ip_scale=[torch.ones(3)]), ValueError, r"ip_scale\[0\]: expected shape \(B,\) = \(2\), got \(3\)"),
        (dict(ip_scale=[float("nan")]), ValueError, r"ip_scale\[0\]: expected a finite float, got nan"),
        (dict(ip_scale=["1"]), TypeError, r"ip_scale\[0\]: expected a float, got str"),
        (dict(ip_mask=[torch.rand(2, 9)]), ValueError, r"ip_mask\[0\]: expected shape \(B, N\) = \(2, 8\), got \(2, 9\)"),
        (dict(ip_mask=[None, torch.rand(2, 8)]), ValueError, r"ip_mask: expected one entry .* per IP stream \(1\), got 2"),
        (dict(text_bias=torch.zeros(2, 6)), ValueError, r"text_bias: expected shape \(B, Lt\) = \(2, 5\), got \(2, 6\)"),
        (dict(text_bias=torch.zeros(2, 5, dtype=torch.int32)), TypeError, r"text_bias: expected a bool or floating-point tensor, got torch.int32"),
        (dict(sm_scale=float("inf")), ValueError, r"sm_scale: expected a finite float, got inf"),
        (dict(joint_k=torch.randn(2, 3, 2, 16)), ValueError, r"joint_k, joint_v: expected both or neither, got joint_k only"),
        (dict(joint_bias=torch.zeros(2, 3)), ValueError, r"joint_bias: given without joint_k and joint_v"),
        (dict(joint_k=torch.randn(2, 3, 2, 16), joint_v=torch.randn(2, 4, 2, 16)), ValueError,
         r"joint_v: expected shape \(B, Lj, H, D\) = \(2, 3, 2, 16\), got \(2, 4, 2, 16\)"),
        (dict(joint_k=torch.randn(2, 3, 2, 16), joint_v=torch.randn(2, 3, 2, 16), joint_bias=torch.zeros(2, 4)), ValueError,
         r"joint_bias: expected shape \(B, L\) = \(2, 3\), got \(2, 4\)"),
        (dict(backend="cuda"), ValueError, r"backend: expected one of 'auto', 'triton', 'torch', got 'cuda'"),
    ],
)
def test_bad_input_is_named(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        decoupled_attention(**_good(**over))


def test_zero_size_batch_returns_empty():
    kwargs = make_case(0, 8, 2, 16, 5, (4,), torch.float32)
    assert decoupled_attention(**kwargs, backend="triton").shape == (0, 8, 2, 16)
    assert decoupled_attention(**kwargs, backend="torch").shape == (0, 8, 2, 16)
