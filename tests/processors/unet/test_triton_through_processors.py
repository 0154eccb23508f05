"""The fused Triton kernel (interpreted, see tests/conftest.py) behind the processors.

Every other processor test runs the torch backend (``auto`` on CPU); these force the
kernel with ``use_backend("triton")`` so the layouts the processors hand it (views of
the projections, masks, several adapters, a whole UNet) are checked on the real kernel.
"""
import pytest
import torch

import instantstyle.kernels.op as op
from instantstyle.kernels import check_close, use_backend
from instantstyle.loaders import load_ip_adapter

from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet
from helpers.ip_attention import inputs, make_attn, make_pair, run_both
from helpers.unet_reference import diffusers_loaded, forward


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts launches of the Triton path, so a silent fallback to torch can't pass."""
    calls = []
    original = op.RUNNERS["triton"]
    monkeypatch.setitem(op.RUNNERS, "triton", lambda inputs: calls.append(inputs.q.shape) or original(inputs))
    return calls


@pytest.mark.parametrize("dtype, precision", [(torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("adapters, scale", [(((1, 4),), 0.8), (((3, 4), (1, 16)), [0.5, 1.25])])
def test_processor_on_the_kernel_matches_diffusers(adapters, scale, dtype, precision, triton_calls):
    attn = make_attn(torch.float64)
    ref, ours = make_pair(tuple(t for _, t in adapters), scale, torch.float64)
    hidden, (text, ips) = inputs(adapters=adapters)
    _, expected = run_both(attn, ref, ours, hidden, (text, ips))  # diffusers, in float64
    attn.to(dtype)
    ours.to(dtype)
    with use_backend("triton"), torch.no_grad():
        got = attn(hidden.to(dtype), encoder_hidden_states=(text.to(dtype), [s.to(dtype) for s in ips]))
    assert len(triton_calls) == 1
    check_close(got, expected, precision)


@pytest.mark.slow  # a whole UNet in the Triton interpreter
def test_tiny_sdxl_unet_style_preset_on_the_kernel(triton_calls):
    unet = tiny_unet("sdxl")
    ckpt = random_checkpoint(unet, seed=3)
    embeds = [image_embeds(2, 1, seed=5)]
    ref = diffusers_loaded(unet, [ckpt], {"up": {"block_0": [0.0, 1.0, 0.0]}})
    load_ip_adapter(unet, ckpt, target="style")
    expected = forward(ref, embeds)
    with use_backend("triton"):
        got = forward(unet, embeds)
    cross_layers = sum(name.endswith("attn2.processor") for name in unet.attn_processors)
    assert len(triton_calls) >= cross_layers  # every cross-attention layer ran the kernel
    check_close(got, expected, "fp32")
