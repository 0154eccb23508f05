"""Every backend against the float64 reference, across the shapes real models produce.

The Triton kernel runs under TRITON_INTERPRET=1 (see conftest) into a NaN-poisoned
output, so an element the kernel forgets to write fails the test.
"""
import pytest
import torch

from instantstyle.kernels import check_close, decoupled_attention, normalize_inputs, reference_decoupled_attention
from instantstyle.kernels.triton_decoupled import triton_decoupled_attention

from helpers.kernel_cases import CASES, DTYPES, case_kwargs, make_case


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_float64_reference(case, dtype_name):
    kwargs = case_kwargs(case, DTYPES[dtype_name])
    inputs = normalize_inputs(**kwargs)
    poisoned = torch.full(inputs.q.shape, float("nan"), dtype=inputs.q.dtype)
    out = triton_decoupled_attention(inputs, out=poisoned)
    assert out is poisoned
    check_close(out, reference_decoupled_attention(inputs), dtype_name)  # the interpreter's fp32 dots are exact: no tf32


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_backend_matches_float64_reference(case, dtype_name):
    kwargs = case_kwargs(case, DTYPES[dtype_name])
    out = decoupled_attention(**kwargs, backend="torch")
    check_close(out, reference_decoupled_attention(normalize_inputs(**kwargs)), dtype_name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_public_op_output_layout(backend):
    kwargs = make_case(2, 33, 3, 40, 77, (4,), torch.float16, layout="heads_first")
    out = decoupled_attention(**kwargs, backend=backend)
    assert out.shape == (2, 33, 3, 40) and out.dtype == torch.float16
    assert out.is_contiguous()  # so .view(B, N, H * D) is free
    out.view(2, 33, 120)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rows_with_every_text_key_masked_are_zero_like_sdpa(backend):
    kwargs = make_case(2, 9, 2, 64, 77, (), torch.float32, bias="bool")
    kwargs["text_bias"][1] = False  # sample 1 attends to no text key at all
    out = decoupled_attention(**kwargs, backend=backend)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    check_close(out, reference_decoupled_attention(normalize_inputs(**kwargs)), "fp32")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_scale_everywhere_equals_no_stream(backend):
    with_zero = make_case(2, 40, 2, 64, 77, (4,), torch.float32, scales=[torch.zeros(2)])
    without = dict(with_zero, ip_k=[], ip_v=[], ip_scale=[])
    a = decoupled_attention(**with_zero, backend=backend)
    b = decoupled_attention(**without, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_python_zero_scale_drops_the_stream_before_any_backend():
    kwargs = make_case(1, 8, 1, 16, 5, (4, 4), torch.float32, scales=[0, 1.0], masks=True)
    inputs = normalize_inputs(**kwargs)
    assert inputs.num_streams == 1
    assert inputs.ip_k[0] is kwargs["ip_k"][1]
    assert inputs.ip_mask.shape == (1, 1, 8)


def test_scale_and_mask_enter_linearly():
    """Doubling a scale adds the stream's masked term once more; a zero mask row removes it."""
    kwargs = make_case(2, 24, 2, 32, 10, (4,), torch.float64, scales=[1.0], masks=True)
    kwargs["ip_mask"][0][:, :5] = 0.0
    one = decoupled_attention(**kwargs, backend="torch")
    two = decoupled_attention(**dict(kwargs, ip_scale=[2.0]), backend="torch")
    none = decoupled_attention(**dict(kwargs, ip_scale=[0]), backend="torch")
    torch.testing.assert_close(two - one, one - none)
    torch.testing.assert_close(one[:, :5], none[:, :5])
    assert (one[:, 5:] - none[:, 5:]).abs().min() > 0


def test_float64_keeps_inexact_scales_exact():
    """0.6 is not representable in fp32; fp64 inputs must not round it (fp64 tolerance is 1e-12)."""
    kwargs = make_case(2, 12, 2, 16, 5, (4,), torch.float64, masks=True, bias="additive")
    run = lambda s: decoupled_attention(**dict(kwargs, ip_scale=[s]), backend="torch")  # noqa: E731
    base = run(0)
    check_close(run(0.6) - base, 0.6 * (run(1.0) - base), "fp64")
