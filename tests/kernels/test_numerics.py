"""Every backend against the float64 reference, across the shapes real models produce.

The Triton kernel runs under TRITON_INTERPRET=1 (see conftest) into a NaN-poisoned
output, so an element the kernel forgets to write fails the test.
"""
import pytest
import torch

from instantstyle.kernels import check_close, decoupled_attention, normalize_inputs, reference_decoupled_attention
from instantstyle.kernels.triton_decoupled import triton_decoupled_attention

from kernel_cases import make_case

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


def _kwargs(case, dtype):
    _, B, N, H, D, Lt, ip_lens, extras = case
    extras = dict(extras)
    if extras.get("scales") == "per_sample":
        # includes a sample whose scale is 0 for one stream: the kernel's skip branch
        extras["scales"] = [torch.tensor([0.0, 0.7, 1.5]), torch.tensor([1.0, 0.0, -0.5])]
    return make_case(B, N, H, D, Lt, ip_lens, dtype, **extras)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_float64_reference(case, dtype_name):
    kwargs = _kwargs(case, DTYPES[dtype_name])
    inputs = normalize_inputs(**kwargs)
    poisoned = torch.full(inputs.q.shape, float("nan"), dtype=inputs.q.dtype)
    out = triton_decoupled_attention(inputs, out=poisoned)
    assert out is poisoned
    check_close(out, reference_decoupled_attention(inputs), dtype_name)  # the interpreter's fp32 dots are exact: no tf32


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_backend_matches_float64_reference(case, dtype_name):
    kwargs = _kwargs(case, DTYPES[dtype_name])
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
