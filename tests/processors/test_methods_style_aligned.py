"""StyleAligned on tiny SDXL / SD1.5 UNets against a float64 reference of the upstream math."""
from __future__ import annotations

import copy

import pytest
import torch
from ip_fixtures import tiny_unet
from method_cases import RefStyleAligned, one_layer, run, with_processors

from instantstyle.kernels import check_close
from instantstyle.processors import StyleAligned, apply_method, registry_of, remove_method
from instantstyle.processors.methods.style_aligned import switch_vector

CASES = [
    ("sdxl", {}, {}, 4),
    ("sdxl", dict(keys_scale=0.7, score_shift=0.4, adain_values=True), dict(keys_scale=0.7, score_shift=0.4, adain_values=True), 4),
    ("sdxl", dict(adain_queries=False, cfg=False), dict(adain_queries=False, halves=1), 3),
    ("sd15", dict(keys_scale=1.3), dict(keys_scale=1.3), 6),
]


@pytest.mark.parametrize("arch, ours_kwargs, ref_kwargs, batch", CASES)
def test_matches_upstream_math(arch, ours_kwargs, ref_kwargs, batch):
    unet = tiny_unet(arch)
    ref, _ = with_processors(unet, lambda: RefStyleAligned(**ref_kwargs))
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
    """Rows 0 and B//2 are references: they attend to themselves only, so they equal the
    plain model's output for those rows, and changing the other half does not move them."""
    unet = tiny_unet("sdxl")
    base = run(copy.deepcopy(unet), batch=4)
    ours = copy.deepcopy(unet)
    apply_method(ours, StyleAligned())
    got = run(ours, batch=4)
    # a reference attends to [own K; own K] with values [own V; own V]: the same softmax average
    check_close(got[[0, 2]], base[[0, 2]], "fp32")
    assert (got[[1, 3]] - base[[1, 3]]).norm() > 1e-3 * base[[1, 3]].norm()


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
    with pytest.raises(ValueError, match="end_at"):
        StyleAligned(start_at=0.8, end_at=0.2)
    unet = tiny_unet("sdxl")
    apply_method(unet, StyleAligned())
    with pytest.raises(ValueError, match="batch divisible by 2"):
        run(unet, batch=3)
    remove_method(unet, "style_aligned")
    with pytest.raises(ValueError, match="matches no self-attention layer"):
        apply_method(unet, StyleAligned(target=["up_blocks.2"]))  # UpBlock2D: no attention
