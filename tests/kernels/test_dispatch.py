"""Which backend runs, why the others don't, and the autograd route."""
import pytest
import torch

from instantstyle.kernels import decoupled_attention, explain_dispatch, normalize_inputs, reference_decoupled_attention

from helpers.kernel_cases import make_case


def test_auto_on_cpu_picks_torch_and_says_why_not_triton():
    d = explain_dispatch(**make_case(1, 8, 1, 16, 5, (4,), torch.float16))
    assert d.backend == "torch"
    assert any("interpreter is for tests" in why for why in d.reasons["triton"])
    assert "triton not used" in str(d)
    assert d.as_dict()["not_chosen"]["triton"] == d.reasons["triton"]


def test_explicit_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' can't run these inputs: CPU tensors"):
        decoupled_attention(**make_case(1, 8, 1, 16, 5, (4,), torch.float16), backend="triton")


@pytest.mark.parametrize(
    "over, reason",
    [
        (dict(dtype=torch.float64), "dtype torch.float64"),
        (dict(D=264), "head dim 264"),
        (dict(D=4), "head dim 4"),
    ],
)
def test_triton_declares_what_it_cannot_take(over, reason):
    shape = dict(B=1, N=4, H=1, D=16, Lt=3, ip_lens=(2,), dtype=torch.float32)
    shape.update(over)
    kwargs = make_case(**shape)
    with pytest.raises(ValueError, match=reason):
        explain_dispatch(**kwargs, backend="triton")
    # ...and auto still runs it, correctly, on the torch path
    out = decoupled_attention(**kwargs)
    ref = reference_decoupled_attention(normalize_inputs(**kwargs))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_non_contiguous_last_dim_routes_to_torch_with_reason():
    kwargs = make_case(1, 6, 2, 16, 5, (4,), torch.float32)
    kwargs["q"] = torch.randn(1, 6, 2, 32)[..., ::2]  # stride 2 in the last dim
    with pytest.raises(ValueError, match=r"q: the last dim must be contiguous"):
        explain_dispatch(**kwargs, backend="triton")
    ref = reference_decoupled_attention(normalize_inputs(**kwargs))
    torch.testing.assert_close(decoupled_attention(**kwargs).double(), ref, rtol=1e-4, atol=1e-5)


def test_grad_requiring_inputs_take_the_autograd_path():
    kwargs = make_case(2, 5, 2, 8, 4, (3, 2), torch.float64, masks=True)
    for name in ("q", "k", "v"):
        kwargs[name].requires_grad_(True)
    kwargs["ip_k"][0].requires_grad_(True)
    assert explain_dispatch(**kwargs).backend == "torch"
    fp32 = make_case(1, 5, 1, 16, 4, (3,), torch.float32)
    fp32["q"].requires_grad_(True)
    assert explain_dispatch(**fp32, backend="triton").backend == "triton"  # the kernel has a backward now
    decoupled_attention(**fp32, backend="triton").sum().backward()
    assert fp32["q"].grad is not None and torch.isfinite(fp32["q"].grad).all()

    def f(q, k, v, ipk0):
        return decoupled_attention(q, k, v, [ipk0, kwargs["ip_k"][1]], kwargs["ip_v"], kwargs["ip_scale"], kwargs["ip_mask"])

    assert torch.autograd.gradcheck(f, (kwargs["q"], kwargs["k"], kwargs["v"], kwargs["ip_k"][0]))


def test_use_backend_sets_the_default_and_restores_it():
    from instantstyle.kernels import use_backend

    kwargs = make_case(1, 8, 1, 16, 5, (4,), torch.float32)
    assert explain_dispatch(**kwargs).backend == "torch"
    with use_backend("triton"):
        assert explain_dispatch(**kwargs).backend == "triton"
        assert explain_dispatch(**kwargs, backend="torch").backend == "torch"  # an explicit argument wins
        out = decoupled_attention(**kwargs)
    assert explain_dispatch(**kwargs).backend == "torch"
    torch.testing.assert_close(out.double(), reference_decoupled_attention(normalize_inputs(**kwargs)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend: expected one of"):
        with use_backend("cuda"):
            pass
