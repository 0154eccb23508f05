"""StyleAligned on tiny SDXL / SD1.5 UNets against a float64 reference of the upstream math."""
from __future__ import annotations

import copy

import pytest
import torch

from instantstyle.kernels import check_close
from instantstyle.processors import registry_of
from instantstyle.processors.methods import StyleAligned, apply_method, remove_method
from instantstyle.processors.methods.shared_norms import share_group_norms, unshare_group_norms
from instantstyle.processors.methods.style_aligned import switch_vector

from helpers.ip_fixtures import tiny_unet
from helpers.method_cases import RefStyleAligned, one_layer, run, share_norms, with_processors

# (arch, our options, reference attention options, upstream-style shared norms (None: off), batch)
CASES = [
    ("sdxl", {}, {}, dict(halves=2), 4),
    ("sdxl", dict(keys_scale=0.7, score_shift=0.4, adain_values=True), dict(keys_scale=0.7, score_shift=0.4, adain_values=True),
     dict(halves=2), 4),
    ("sdxl", dict(adain_queries=False, cfg=False), dict(adain_queries=False, halves=1), dict(halves=1), 3),
    ("sdxl", dict(share_group_norm=False, share_layer_norm=False), {}, None, 4),
    ("sd15", dict(keys_scale=1.3), dict(keys_scale=1.3), dict(halves=2), 6),
]


@pytest.mark.slow  # whole tiny UNets
@pytest.mark.parametrize("arch, ours_kwargs, ref_kwargs, norms, batch", CASES)
def test_matches_upstream_math(arch, ours_kwargs, ref_kwargs, norms, batch):
    """The whole UNet against upstream's attention math and (by default) its shared
    GroupNorm AND LayerNorm patching: ours shares only GroupNorm statistics, so this also
    checks that upstream's LayerNorm sharing is a no-op on a UNet."""
    unet = tiny_unet(arch)
    ref, _ = with_processors(unet, lambda: RefStyleAligned(**ref_kwargs))
    if norms is not None:
        assert share_norms(ref, **norms)
    expected = run(ref, batch=batch, dtype=torch.float64)
    ours = copy.deepcopy(unet)
    base = run(ours, batch=batch)
    apply_method(ours, StyleAligned(**ours_kwargs))
    got = run(ours, batch=batch)
    check_close(got, expected, "fp32")
    assert (got - base).norm() > 1e-3 * base.norm()  # the method does something
    ours64 = copy.deepcopy(unet).double()
    apply_method(ours64, StyleAligned(**ours_kwargs))
    check_close(run(ours64, batch=batch, dtype=torch.float64), expected, "fp64")


@pytest.mark.parametrize("dtype, precision", [(torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_one_layer_within_dtype_tolerance(dtype, precision):
    kwargs = dict(keys_scale=0.8, score_shift=0.25)
    got, expected = one_layer(tiny_unet("sdxl"), StyleAligned(**kwargs), RefStyleAligned(**kwargs), dtype)
    assert got.dtype == dtype
    check_close(got, expected, precision)


def test_each_cfg_half_references_its_own_first_image():
    """Rows 0 and B//2 are references: they attend to themselves only and their shared
    GroupNorms see [own ; own], so they equal the plain model's output for those rows."""
    unet = tiny_unet("sdxl")
    base = run(copy.deepcopy(unet), batch=4)
    ours = copy.deepcopy(unet)
    apply_method(ours, StyleAligned())
    got = run(ours, batch=4)
    # a reference attends to [own K; own K] with values [own V; own V]: the same softmax average
    check_close(got[[0, 2]], base[[0, 2]], "fp32")
    assert (got[[1, 3]] - base[[1, 3]]).norm() > 1e-3 * base[[1, 3]].norm()


def _by_hand_shared_group_norm(norm, x, halves):
    """GroupNorm of each row with mean/var over its groups in [own ; reference] (biased var)."""
    batch, channels = x.shape[:2]
    per, size = batch // halves, channels // norm.num_groups
    out = torch.empty_like(x)
    for b in range(batch):
        r = b // per * per
        for g in range(norm.num_groups):
            c = slice(g * size, (g + 1) * size)
            both = torch.cat([x[b, c].reshape(-1), x[r, c].reshape(-1)])
            mean = both.sum() / both.numel()
            var = ((both - mean) ** 2).sum() / both.numel()
            out[b, c] = (x[b, c] - mean) / torch.sqrt(var + norm.eps)
    shape = (1, channels) + (1,) * (x.ndim - 2)
    return out * norm.weight.reshape(shape) + norm.bias.reshape(shape)


@pytest.mark.parametrize("shape, halves", [((4, 8, 3, 5), 2), ((3, 8, 6), 1), ((4, 8, 2, 3, 2), 2)])
def test_one_shared_group_norm_by_hand(shape, halves):
    g = torch.Generator().manual_seed(1)
    norm = torch.nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(8, generator=g, dtype=torch.float64))
        norm.bias.copy_(0.3 * torch.randn(8, generator=g, dtype=torch.float64))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + torch.arange(shape[0], dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1))
    model = torch.nn.Sequential(norm)
    with torch.no_grad():
        plain = model(x)
        assert share_group_norms(model, halves, owner="m") == 1
        got = model(x)
        expected = _by_hand_shared_group_norm(norm, x, halves)
    check_close(got, expected, "fp64")
    refs = [b // (shape[0] // halves) * (shape[0] // halves) for b in range(shape[0])]
    others = [b for b in range(shape[0]) if refs[b] != b]
    references = sorted(set(refs))  # stats over [own ; own]: the plain GroupNorm
    check_close(got[references], plain[references], "fp64")
    assert (got[others] - plain[others]).abs().max() > 1e-2  # the others really moved
    assert unshare_group_norms(model, "m") == 1 and "forward" not in norm.__dict__
    with torch.no_grad():
        assert torch.equal(model(x), plain)


def test_shared_group_norm_follows_the_step_gate_in_one_graph():
    """Closed: exactly the plain GroupNorm; open: shared.  One compiled graph for both."""
    from instantstyle.processors.core.gating import StepGate

    torch._dynamo.reset()
    norm = torch.nn.GroupNorm(2, 4)
    x = torch.randn(4, 4, 3, 3)
    with torch.no_grad():
        plain = norm(x)
        gate = StepGate(0.5, 1.0)  # open for t <= 499.5
        share_group_norms(norm, 2, gate, owner="m")
        shared = _by_hand_shared_group_norm(norm, x, 2)
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        compiled = torch.compile(lambda h: norm(h), backend=backend)
        for timestep in (900, 100, 900, 100):
            gate.update(timestep)
            got = compiled(x)
            if timestep == 900:
                assert torch.equal(got, plain) and torch.equal(norm(x), plain)
            else:
                check_close(got, shared, "fp32")
    assert len(graphs) == 1
    torch._dynamo.reset()


def test_only_self_level_leaves_evenly_spaced_layers_unshared():
    assert switch_vector(8, 0.0) == [False] * 8
    assert switch_vector(8, 1.0) == [True] * 8
    assert switch_vector(8, 0.25) == [True, False, False, False, True, False, False, False]
    assert switch_vector(8, 0.75) == [False, True, True, True, False, True, True, True]
    unet = tiny_unet("sdxl")
    injection = apply_method(unet, StyleAligned(only_self_level=0.5))
    selves = registry_of(unet).resolve("all", "self")
    assert len(injection.weights) == len(selves) - sum(switch_vector(len(selves), 0.5))
    assert all(name.endswith("attn1.processor") for name in injection.weights)


def test_step_gate_switches_the_method_without_rebuilding():
    unet = tiny_unet("sdxl")
    plain = copy.deepcopy(unet)
    always = copy.deepcopy(unet)
    apply_method(always, StyleAligned())
    gated = copy.deepcopy(unet)
    apply_method(gated, StyleAligned(start_at=0.5))  # second half of the schedule: t <= 499.5
    check_close(run(gated, timestep=900), run(plain, timestep=900), "fp32")
    check_close(run(gated, timestep=100), run(always, timestep=100), "fp32")


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="keys_scale: expected a number"):
        StyleAligned(keys_scale="big")
    with pytest.raises(ValueError, match="only_self_level"):
        StyleAligned(only_self_level=1.5)
    with pytest.raises(TypeError, match="cfg: expected True or False"):
        StyleAligned(cfg=2)
    with pytest.raises(TypeError, match="share_group_norm: expected True or False"):
        StyleAligned(share_group_norm="yes")
    with pytest.raises(ValueError, match="end_at"):
        StyleAligned(start_at=0.8, end_at=0.2)
    unet = tiny_unet("sdxl")
    apply_method(unet, StyleAligned())
    with pytest.raises(ValueError, match="batch divisible by 2"):
        run(unet, batch=3)
    remove_method(unet, "style_aligned")
    with pytest.raises(ValueError, match="matches no self-attention layer"):
        apply_method(unet, StyleAligned(target=["up_blocks.2"]))  # UpBlock2D: no attention
