"""The op is a torch.library custom op: torch.compile traces it whole, and scales are values."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from instantstyle.kernels import decoupled_attention

from helpers.kernel_cases import make_case


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn, counter):
    return torch.compile(fn, backend=counter, fullgraph=True)


def test_fullgraph_compile_matches_eager_and_scale_changes_do_not_recompile():
    kwargs = make_case(2, 16, 2, 32, 7, (4, 16), torch.float32, masks=True, bias="bool")

    def attn(q, k, v, ip_k, ip_v, scales, masks, bias):
        return decoupled_attention(q, k, v, ip_k, ip_v, scales, masks, bias)

    counter = CompileCounterWithBackend("aot_eager")
    fn = _compiled(attn, counter)
    args = [kwargs[n] for n in ("q", "k", "v", "ip_k", "ip_v")]
    for s0, s1 in [(0.5, 1.0), (0.0, 2.0), (1.5, 0.0)]:
        scales = [torch.full((2,), s0), torch.full((2,), s1)]
        out = fn(*args, scales, kwargs["ip_mask"], kwargs["text_bias"])
        eager = decoupled_attention(*args, scales, kwargs["ip_mask"], kwargs["text_bias"])
        torch.testing.assert_close(out, eager)
    assert counter.frame_count == 1  # one graph, no graph breaks, no recompiles
    graph_ops = [str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("instantstyle.decoupled_attention" in op for op in graph_ops)


@pytest.mark.slow  # inductor codegen
def test_inductor_compiles_the_op():
    kwargs = make_case(1, 8, 2, 16, 5, (4,), torch.float32)
    fn = torch.compile(lambda q, k, v, ik, iv: decoupled_attention(q, k, v, ik, iv, 0.7) * 2, fullgraph=True)
    out = fn(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["ip_k"], kwargs["ip_v"])
    ref = decoupled_attention(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["ip_k"], kwargs["ip_v"], 0.7) * 2
    torch.testing.assert_close(out, ref)


def test_opcheck_fake_and_schema():
    kwargs = make_case(2, 9, 2, 16, 5, (4,), torch.float32)
    args = (
        kwargs["q"], kwargs["k"], kwargs["v"], kwargs["ip_k"], kwargs["ip_v"],
        torch.ones(1, 2), None, None, 0.25, "torch",
    )
    torch.library.opcheck(torch.ops.instantstyle.decoupled_attention.default, args, test_utils=("test_schema", "test_faketensor"))


def test_python_float_scales_become_graph_inputs_after_one_dynamic_recompile():
    """dynamo compiles a float statically once, then as a dynamic input: no recompile per value."""
    kwargs = make_case(2, 16, 2, 32, 7, (4,), torch.float32)
    args = [kwargs[n] for n in ("q", "k", "v", "ip_k", "ip_v")]
    counter = CompileCounterWithBackend("aot_eager")
    fn = _compiled(lambda q, k, v, ik, iv, s: decoupled_attention(q, k, v, ik, iv, [s]), counter)
    for s in (0.5, 1.0, 2.0, 3.0, 0.0, 1.25):
        torch.testing.assert_close(fn(*args, s), decoupled_attention(*args, [s]))
    assert counter.frame_count == 2
