"""The op's backward against float64 autograd of the plain math (reference.py).

* The torch backend's formulas (kernels/backward.py) through the custom op: gradcheck in
  float64.
* The Triton backward under TRITON_INTERPRET=1 (see conftest) in float32 (and fp16/bf16
  on a few cases) against float64 gradients, into NaN-poisoned buffers, so a gradient
  element no kernel writes fails.  The cases cross every path: one-tile and two-pass key
  ranges, several query and key tiles, padded head dims, odd N, masks, biases, joint
  keys, several IP streams, per-sample and zero scales.
* Wiring: the public op with ``backend="triton"``, the dispatch, torch.compile of
  forward + backward, opcheck of both custom ops.
"""
import pytest
import torch

from instantstyle.kernels import decoupled_attention, explain_dispatch, normalize_inputs, reference_decoupled_attention
from instantstyle.kernels.backward import GradNeeds, needs_of, torch_decoupled_attention_backward
from instantstyle.kernels.tolerances import check_grad_close
from instantstyle.kernels.triton_bwd_launch import bwd_config, plan_backward, triton_decoupled_attention_backward

from helpers.kernel_cases import make_case

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _leaves(kwargs):
    """{name: tensor} of every floating-point input, ``ip_k0`` style for list entries."""
    found = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            found[name] = value
        elif isinstance(value, (list, tuple)):
            for i, t in enumerate(value):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    found[f"{name}{i}"] = t
    return found


def _float64_copy(kwargs, grad_names):
    """kwargs in float64 with the named leaves requiring grad; returns (kwargs64, leaves64)."""
    out, leaves = {}, {}

    def convert(name, t):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        t = t.detach().double().requires_grad_(name in grad_names)
        leaves[name] = t
        return t

    for name, value in kwargs.items():
        if isinstance(value, (list, tuple)):
            out[name] = [convert(f"{name}{i}", t) for i, t in enumerate(value)]
        else:
            out[name] = convert(name, value)
    return out, leaves


def reference_grads(kwargs, dout, grad_names):
    """float64 autograd of reference.py: {name: grad} for ``grad_names``."""
    kw64, leaves = _float64_copy(kwargs, grad_names)
    out = reference_decoupled_attention(normalize_inputs(**kw64))
    names = [n for n in grad_names if n in leaves]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], dout.double(), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(names, grads)}


def _canonical_grads(grads, S):
    """:class:`Grads` as {name: tensor} in the canonical (S, B[, N]) layout of scales/masks."""
    found = {"q": grads.q, "k": grads.k, "v": grads.v, "text_bias": grads.text_bias, "joint_k": grads.joint_k,
             "joint_v": grads.joint_v, "joint_bias": grads.joint_bias}
    found.update({f"ip_k{s}": g for s, g in enumerate(grads.ip_k)})
    found.update({f"ip_v{s}": g for s, g in enumerate(grads.ip_v)})
    for s in range(S):
        found[f"ip_scale{s}"] = grads.ip_scale[s] if grads.ip_scale is not None else None
        found[f"ip_mask{s}"] = grads.ip_mask[s] if grads.ip_mask is not None else None
    return {n: g for n, g in found.items() if g is not None}


# (id, B, N, H, D, Lt, ip_lens, extras); every float input gets a gradient.
CASES = [
    # 3 query tiles; text (77) and the stream in one tile each
    ("sdxl_like_3_query_tiles", 2, 130, 2, 64, 77, (4,), {}),
    # awkward sizes: padded head dim, odd N, a 16-token stream, bool text mask
    ("n67_lt77_d40_masks_bool_bias", 2, 67, 2, 40, 77, (4, 16), {"masks": True, "bias": "bool"}),
    # D=80 pads to 128, where 64-key steps make the 77 text keys a two-pass range (2 key tiles)
    ("d80_text_two_pass_additive_bias", 1, 67, 2, 80, 77, (16,), {"bias": "additive"}),
    # long text and joint keys with biases: 3 key tiles each in the key-tile pass
    ("long_text_and_joint_keys", 1, 70, 1, 32, 150, (4,), {"bias": "additive", "joint": 140, "joint_bias": "additive"}),
    # a 257-token stream (two passes) next to a one-tile stream, per-sample scales with zeros
    ("ip257_two_pass_per_sample_scales", 2, 40, 1, 16, 20, (257, 4), {"masks": True, "scales": "per_sample"}),
    # several streams, one-tile ones of 1..33 tokens (16- and 64-key tiles)
    ("four_streams_masked", 1, 33, 2, 32, 20, (4, 16, 1, 33), {"masks": True}),
    # joint keys that fit one tile, with a bool joint bias
    ("short_joint_bool_bias", 2, 20, 2, 24, 9, (4,), {"joint": 12, "joint_bias": "bool", "bias": "additive"}),
]


def _kwargs(case, dtype):
    _, B, N, H, D, Lt, ip_lens, extras = case
    extras = dict(extras)
    if extras.get("scales") == "per_sample":
        extras["scales"] = [torch.tensor([0.0, 0.7]), torch.tensor([1.5, 0.0])]
    kwargs = make_case(B, N, H, D, Lt, ip_lens, dtype, **extras)
    if "joint_bias" in kwargs and kwargs["joint_bias"].dtype != torch.bool:
        kwargs["joint_bias"] = kwargs["joint_bias"] - 0.5  # make_case shifts it: keep values of both signs
    return kwargs


def _check_triton_case(kwargs, dtype_name, grad_names=None):
    inputs = normalize_inputs(**kwargs)
    names = set(grad_names if grad_names is not None else _leaves(kwargs))
    dout = torch.randn(inputs.q.shape).to(inputs.q.dtype)
    ref = reference_grads(kwargs, dout, names)
    kw64, _ = _float64_copy(kwargs, names)  # which canonical inputs need grad: ask the same leaves
    needs = needs_of(normalize_inputs(**kw64))
    grads = _canonical_grads(triton_decoupled_attention_backward(inputs, dout, needs, poison=True), len(inputs.ip_k))
    missing = sorted(n for n in ref if n not in grads)
    assert not missing, f"no gradient for {missing}"
    for name, g in grads.items():
        if name in ref:
            check_grad_close(name, g, ref[name], dtype_name)
    return grads


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_backward_matches_float64_autograd_fp32(case):
    _check_triton_case(_kwargs(case, torch.float32), "fp32")


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=[CASES[i][0] for i in (1, 3, 4)])
def test_triton_backward_matches_float64_autograd_half(case, dtype_name):
    _check_triton_case(_kwargs(case, DTYPES[dtype_name]), dtype_name)


def test_case_table_crosses_every_path():
    """The cases above reach one-tile and two-pass ranges and several query tiles."""
    kinds = set()
    for case in CASES:
        inputs = normalize_inputs(**_kwargs(case, torch.float32))
        needs = GradNeeds(q=True, kv=True, ip_kv=(True,) * len(inputs.ip_k), text_bias=True, joint_kv=True, joint_bias=True)
        plan = plan_backward(inputs, inputs.q, needs)
        kinds |= {(r.kind, r.one_tile) for r in plan.ranges}
        kinds |= {("query tiles", launch.grid[0] // (inputs.q.shape[0] * inputs.q.shape[2]) > 1)
                  for launch in plan.launches if launch.kernel == "_bwd_query_tiles"}
        kinds |= {("key tiles", launch.grid[0] // (inputs.q.shape[0] * inputs.q.shape[2]) > 1)
                  for launch in plan.launches if launch.kernel == "_bwd_key_tiles"}
    for kind in ("text", "joint", "ip"):
        assert (kind, True) in kinds and (kind, False) in kinds, kind
    assert ("query tiles", True) in kinds and ("key tiles", True) in kinds


def test_fully_masked_rows_get_zero_gradients():
    """A sample whose text keys are all masked (bool and -inf float biases): the op gives 0
    there, so its text-stream gradients are exactly 0 and nothing is NaN."""
    kwargs = make_case(2, 20, 1, 32, 150, (4,), torch.float32, bias="bool")
    kwargs["text_bias"][1] = False
    _check_triton_case(kwargs, "fp32")
    kwargs["text_bias"] = torch.randn(2, 150)
    kwargs["text_bias"][1] = float("-inf")
    kwargs["text_bias"][0, :7] = float("-inf")
    grads = _check_triton_case(kwargs, "fp32")
    assert grads["k"][1].abs().max() == 0 and grads["text_bias"][1].abs().max() == 0


def test_zero_tensor_scales_give_zero_ip_grads_and_a_scale_grad():
    """scale 0 for a sample: no IP K/V gradient there, but d scale is D_s summed (not 0)."""
    kwargs = make_case(2, 24, 2, 32, 77, (4, 257), torch.float32, scales=[torch.zeros(2), torch.tensor([0.0, 1.0])])
    grads = _check_triton_case(kwargs, "fp32")
    assert grads["ip_k0"].abs().max() == 0 and grads["ip_v1"][0].abs().max() == 0
    assert grads["ip_scale0"].abs().min() > 0


def test_style_block_adapter_needs_only_ip_kv():
    """Only dK_ip/dV_ip requested: the text stream and dQ are specialised away."""
    kwargs = make_case(1, 67, 2, 40, 77, (4,), torch.float32, bias="bool")
    inputs = normalize_inputs(**kwargs)
    needs = GradNeeds(ip_kv=(True,))
    plan = plan_backward(inputs, inputs.q, needs)
    assert [launch.kernel for launch in plan.launches] == ["_bwd_preprocess", "_bwd_query_tiles"]
    assert plan.launches[0].constexprs["TEXT"] is False and plan.launches[1].constexprs["NEED_DQ"] is False
    assert plan.dq is None
    grads = _check_triton_case(kwargs, "fp32", grad_names={"ip_k0", "ip_v0"})
    assert set(grads) == {"ip_k0", "ip_v0"}


def test_backward_is_deterministic():
    kwargs = make_case(1, 130, 1, 32, 77, (4, 257), torch.float32, masks=True)
    inputs = normalize_inputs(**kwargs)
    dout = torch.randn(inputs.q.shape)
    needs = GradNeeds(q=True, kv=True, ip_kv=(True, True), ip_scale=True)
    a = triton_decoupled_attention_backward(inputs, dout, needs)
    b = triton_decoupled_attention_backward(inputs, dout, needs)
    for x, y in ((a.q, b.q), (a.k, b.k), (a.ip_k[0], b.ip_k[0]), (a.ip_v[1], b.ip_v[1]), (a.ip_scale, b.ip_scale)):
        assert torch.equal(x, y)


def test_tolerance_catches_a_merged_rowsum():
    """D must be per stream: the FlashAttention shortcut rowsum(dO * O) over the merged
    output gives wrong gradients, and the tolerance says so."""
    kwargs = make_case(1, 30, 1, 16, 10, (4,), torch.float64, scales=[0.8])
    inputs = normalize_inputs(**kwargs)
    dout = torch.randn(inputs.q.shape, dtype=torch.float64)
    ref = reference_grads(kwargs, dout, {"q"})["q"]
    good = torch_decoupled_attention_backward(inputs, dout, GradNeeds(q=True)).q
    check_grad_close("q", good, ref, "fp64")
    out = reference_decoupled_attention(inputs)
    merged = (dout * out).sum(-1).transpose(1, 2)  # (B, H, N): mixes the streams
    q, k, v, do = (t.transpose(1, 2) for t in (inputs.q, inputs.k, inputs.v, dout))
    p = torch.softmax(q @ k.transpose(-1, -2) * inputs.sm_scale, -1)
    wrong_dq = (p * (do @ v.transpose(-1, -2) - merged[..., None])) @ k * inputs.sm_scale
    ik, iv = inputs.ip_k[0].transpose(1, 2), inputs.ip_v[0].transpose(1, 2)
    p_ip = torch.softmax(q @ ik.transpose(-1, -2) * inputs.sm_scale, -1)
    wrong_dq = wrong_dq + 0.8 * (p_ip * (do @ iv.transpose(-1, -2) - merged[..., None])) @ ik * inputs.sm_scale
    with pytest.raises(AssertionError, match="relative L2 error"):
        check_grad_close("q", wrong_dq.transpose(1, 2), ref, "fp32")


# --------------------------------------------------------------------------- torch backend, gradcheck


def _op_function(kwargs, names, backend):
    """f(*leaves) -> the custom op's output, with ``names`` as differentiable arguments."""
    def f(*leaves):
        kw = dict(kwargs)
        for name, t in zip(names, leaves):
            if name[-1].isdigit() and name[:-1] in ("ip_k", "ip_v", "ip_mask", "ip_scale"):
                kw[name[:-1]] = list(kw[name[:-1]])
                kw[name[:-1]][int(name[-1])] = t
            else:
                kw[name] = t
        i = normalize_inputs(**kw)
        return torch.ops.instantstyle.decoupled_attention(
            i.q, i.k, i.v, list(i.ip_k), list(i.ip_v), i.ip_scale, i.ip_mask, i.text_bias, i.sm_scale, backend,
            i.joint_k, i.joint_v, i.joint_bias)
    return f


@pytest.mark.parametrize("extras", [
    {"masks": True, "bias": "additive", "joint": 3, "joint_bias": "additive"},
    {"bias": "bool"},
], ids=["masks_bias_joint", "bool_bias_fully_masked_sample"])
def test_torch_backend_backward_gradcheck_float64(extras):
    scales = [torch.tensor([0.3, 1.2], dtype=torch.float64), 0.5]
    kwargs = make_case(2, 6, 2, 8, 5, (3, 2), torch.float64, scales=scales, **extras)
    for name in ("text_bias", "joint_bias"):
        if name in kwargs and kwargs[name].dtype != torch.bool:
            kwargs[name] = kwargs[name].double()
    if "ip_mask" in kwargs:
        kwargs["ip_mask"] = [m.double() if m is not None else None for m in kwargs["ip_mask"]]
    if extras.get("bias") == "bool":
        kwargs["text_bias"][1] = False  # every text key of sample 1 masked
    leaves = _leaves(kwargs)
    names = [n for n in leaves if n != "ip_scale1"]
    args = [leaves[n].detach().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(_op_function(kwargs, names, "torch"), args)


# --------------------------------------------------------------------------- wiring


def test_public_op_runs_the_triton_backward_for_inputs_that_require_grad():
    kwargs = make_case(1, 40, 2, 40, 77, (4,), torch.float32, masks=True, bias="bool")
    grad_names = ("q", "k", "v", "ip_k0", "ip_v0")
    leaves = _leaves(kwargs)
    for name in grad_names:
        leaves[name].requires_grad_(True)
    assert explain_dispatch(**kwargs, backend="triton").backend == "triton"
    assert explain_dispatch(**kwargs).backend == "torch"  # CPU: "auto" leaves the interpreter to tests
    out = decoupled_attention(**kwargs, backend="triton")
    assert "instantstyle_decoupled_attention" in type(out.grad_fn).__name__
    dout = torch.randn_like(out)
    out.backward(dout)
    ref = reference_grads(kwargs, dout, set(grad_names))
    for name in grad_names:
        check_grad_close(name, leaves[name].grad, ref[name], "fp32")


def test_auto_keeps_the_kernel_for_training_on_a_gpu():
    meta = lambda *s: torch.empty(*s, dtype=torch.float16, device="meta", requires_grad=True)  # noqa: E731
    d = explain_dispatch(meta(2, 4096, 10, 64), meta(2, 77, 10, 64), meta(2, 77, 10, 64), [meta(2, 4, 10, 64)],
                         [meta(2, 4, 10, 64)], 0.5, device="cuda", arch="sm_90")
    assert d.backend == "triton", str(d)


def test_torch_compile_traces_forward_and_backward():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    try:
        kwargs = make_case(1, 20, 2, 16, 7, (4,), torch.float32, bias="additive")
        for name in ("q", "k", "v"):
            kwargs[name].requires_grad_(True)
        kwargs["ip_k"][0].requires_grad_(True)
        fn = torch.compile(lambda **kw: decoupled_attention(**kw, backend="triton"), fullgraph=True,
                           backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")))
        out = fn(**kwargs)
        out.square().sum().backward()
        compiled = [kwargs[n].grad.clone() for n in ("q", "k", "v")] + [kwargs["ip_k"][0].grad.clone()]
    finally:
        torch._dynamo.reset()
    assert any("instantstyle.decoupled_attention.default" in op for op in graphs["fw"])
    assert any("instantstyle.decoupled_attention_backward" in op for op in graphs["bw"])
    for name in ("q", "k", "v"):
        kwargs[name].grad = None
    kwargs["ip_k"][0].grad = None
    decoupled_attention(**kwargs, backend="triton").square().sum().backward()
    eager = [kwargs[n].grad for n in ("q", "k", "v")] + [kwargs["ip_k"][0].grad]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_opcheck_autograd_registration_and_fake_backward():
    kwargs = make_case(2, 9, 2, 16, 5, (4,), torch.float32, masks=True)
    inputs = normalize_inputs(**kwargs)
    q = inputs.q.detach().requires_grad_()
    ipk = inputs.ip_k[0].detach().requires_grad_()
    args = (q, inputs.k, inputs.v, [ipk], list(inputs.ip_v), inputs.ip_scale, inputs.ip_mask, None, 0.25, "torch")
    torch.library.opcheck(torch.ops.instantstyle.decoupled_attention.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    needs = GradNeeds(q=True, ip_kv=(True,), ip_mask=True).as_list()
    bwd_args = (torch.randn(inputs.q.shape), inputs.q, inputs.k, inputs.v, list(inputs.ip_k), list(inputs.ip_v),
                inputs.ip_scale, inputs.ip_mask, None, 0.25, "torch", None, None, None, needs)
    torch.library.opcheck(torch.ops.instantstyle.decoupled_attention_backward.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_bwd_tiles_follow_the_head_dim_and_stream_lengths():
    assert bwd_config(32, (4,)).BLOCK_N_IP == 16 and bwd_config(32, (33,)).BLOCK_N_IP == 32  # capped: 33 keys, 2 passes
    assert bwd_config(64, (4,)).BLOCK_N == 64 and bwd_config(64, (257,)).BLOCK_N_IP == 16
    assert bwd_config(160, (257,)).BLOCK_N_IP <= bwd_config(160, (257,)).BLOCK_N  # never wider than the text step
    assert bwd_config(64, (4,), "float32").BLOCK_M <= bwd_config(64, (4,), "float16").BLOCK_M
