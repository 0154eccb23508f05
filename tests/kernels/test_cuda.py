"""The compiled kernel on a real GPU: numerics, CUDA graphs, torch.compile.

Marked ``gpu``, so skipped without CUDA (the interpreter tests in test_numerics.py cover the
same cases on CPU); run on every GPU a session gets: ``python -m pytest -m gpu``.
"""
import pytest
import torch

from instantstyle.kernels import check_close, decoupled_attention, explain_dispatch, normalize_inputs, reference_decoupled_attention
from instantstyle.kernels.triton_decoupled import triton_decoupled_attention

from helpers.kernel_cases import CASES, DTYPES, case_kwargs, make_case

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


def _to_cuda(kwargs):
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.cuda()
        if isinstance(x, list):
            return [move(t) for t in x]
        return x

    return {k: move(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_compiled_kernel_matches_float64_reference(case, dtype_name):
    kwargs = _to_cuda(casecase_kwargs(case, DTYPES[dtype_name]))
    inputs = normalize_inputs(**kwargs)
    poisoned = torch.full(inputs.q.shape, float("nan"), dtype=inputs.q.dtype, device="cuda")
    out = triton_decoupled_attention(inputs, out=poisoned)
    check_close(out, reference_decoupled_attention(inputs), "tf32" if dtype_name == "fp32" else dtype_name)


def test_auto_picks_triton_for_sdxl_shapes():
    kwargs = _to_cuda(make_case(2, 4096, 10, 64, 77, (4,), torch.float16))
    assert explain_dispatch(**kwargs).backend == "triton"


def test_cuda_graph_replay_reads_new_scale_values():
    kwargs = _to_cuda(make_case(2, 1024, 20, 64, 77, (4,), torch.float16))
    scale = torch.tensor([0.5, 0.5], device="cuda")
    run = lambda: decoupled_attention(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["ip_k"], kwargs["ip_v"], [scale])  # noqa: E731
    run()  # warm-up: compiles, caches the offsets table and the constants outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    scale.fill_(1.5)
    graph.replay()
    torch.cuda.synchronize()
    expected = decoupled_attention(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["ip_k"], kwargs["ip_v"], [1.5], backend="torch")
    check_close(out, expected.float(), "fp16")


def test_inductor_compiles_around_the_triton_op():
    kwargs = _to_cuda(make_case(2, 256, 4, 64, 77, (4, 16), torch.bfloat16))
    args = [kwargs[n] for n in ("q", "k", "v", "ip_k", "ip_v")]
    fn = torch.compile(lambda q, k, v, ik, iv, s: decoupled_attention(q, k, v, ik, iv, s) * 2, fullgraph=True)
    scales = [torch.full((2,), 0.7, device="cuda"), torch.full((2,), 0.3, device="cuda")]
    ref = reference_decoupled_attention(normalize_inputs(*args, scales)) * 2
    check_close(fn(*args, scales), ref, "bf16")
