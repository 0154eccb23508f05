"""Visual Style Prompting: self-attention K/V swapped in from the reference image."""
from __future__ import annotations

import copy

import pytest
import torch

from instantstyle.kernels import check_close
from instantstyle.processors import registry_of
from instantstyle.processors.methods import VisualStylePrompting, apply_method

from helpers.ip_fixtures import tiny_unet
from helpers.method_cases import RefVisualStylePrompting, one_layer, run, with_processors


@pytest.mark.slow  # whole tiny UNets
@pytest.mark.parametrize("arch, cfg, batch", [("sdxl", True, 4), ("sdxl", False, 3), ("sd15", True, 4)])
def test_matches_reference_in_default_blocks(arch, cfg, batch):
    unet = tiny_unet(arch)
    layers = registry_of(unet).resolve("vsp", "self")
    first = "up_blocks.1." if arch == "sdxl" else "up_blocks.2."
    assert layers and all(name.startswith(("up_blocks.1.",) if arch == "sdxl" else ("up_blocks.2.", "up_blocks.3.")) for name in layers)
    assert any(name.startswith(first) for name in layers)
    ref, _ = with_processors(unet, lambda: RefVisualStylePrompting(halves=2 if cfg else 1), only=set(layers))
    expected = run(ref, batch=batch, dtype=torch.float64)
    ours = copy.deepcopy(unet)
    base = run(ours, batch=batch)
    injection = apply_method(ours, VisualStylePrompting(cfg=cfg))
    assert list(injection.weights) == list(layers)
    got = run(ours, batch=batch)
    check_close(got, expected, "fp32")
    assert (got - base).norm() > 1e-3 * base.norm()
    # the references keep their own K/V: they are unchanged
    refs = [0, batch // 2] if cfg else [0]
    check_close(got[refs], base[refs], "fp32")


@pytest.mark.parametrize("dtype, precision", [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
def test_one_layer_within_dtype_tolerance(dtype, precision):
    got, expected = one_layer(tiny_unet("sdxl"), VisualStylePrompting(), RefVisualStylePrompting(), dtype)
    check_close(got, expected, precision)


def test_explicit_target_and_bad_cfg():
    unet = tiny_unet("sdxl")
    injection = apply_method(unet, VisualStylePrompting(target=["up_blocks.0.attentions.1"]))
    assert all(n.startswith("up_blocks.0.attentions.1.") and n.endswith("attn1.processor") for n in injection.weights)
    with pytest.raises(TypeError, match="cfg: expected True or False"):
        VisualStylePrompting(cfg="yes")
