"""The meta-device tier: processors, methods and a whole tiny UNet step run on ``meta``
(shapes only), where a host read of a device value raises and a CPU tensor mixed into
the step is recorded.  These are the bugs only a GPU would otherwise show: a pageable
copy per call, a sync per call, a broken CUDA-graph capture."""
from __future__ import annotations

import pytest
import torch

from instantstyle.kernels import decoupled_attention
from instantstyle.loaders import load_ip_adapter
from instantstyle.processors.methods import AttentionMapCapture, EditingMethod, StyleAligned, VisualStylePrompting, apply_method

from helpers.device_checks import CpuOps, to_meta
from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet, unet_inputs
from helpers.method_cases import FloatStream, MutualSelfAttention


class HostTimestep(EditingMethod):
    """A method that reads the timestep on the host: a sync per call on a GPU."""

    name = "host_timestep"
    kind = "self"

    def replace_kv(self, call):
        return (call.k * 2, call.v) if float(call.timestep) > 500 else (call.k, call.v)


class CpuIndex(EditingMethod):
    """A method that builds its index on the CPU: a copy per call on a GPU."""

    name = "cpu_index"
    kind = "self"

    def replace_kv(self, call):
        rows = torch.zeros(call.batch, dtype=torch.long)
        return call.k[rows.to(call.k.device)], call.v[rows.to(call.k.device)]


def _meta_step(unet, batch=4, watch=None):
    unet = unet.to("meta")
    kwargs = to_meta(unet_inputs(unet, batch=batch))
    kwargs["added_cond_kwargs"]["image_embeds"] = [image_embeds(batch, 1, seed=7).to("meta")]
    with torch.no_grad():
        if watch is None:
            return unet(**kwargs).sample
        with watch:
            return unet(**kwargs).sample


def _loaded():
    unet = tiny_unet("sdxl")
    load_ip_adapter(unet, random_checkpoint(unet, seed=3), target="style+layout", start_at=0.2, end_at=0.9)
    return unet


@pytest.mark.slow  # whole tiny UNets
@pytest.mark.parametrize("methods", [
    [],
    [StyleAligned(end_at=0.8)],
    [FloatStream(start_at=0.1)],
    [StyleAligned(), VisualStylePrompting(start_at=0.3), FloatStream(), MutualSelfAttention()],
])
def test_unet_step_on_meta_makes_no_cpu_tensor_and_reads_nothing_on_the_host(methods):
    unet = _loaded()
    for method in methods:
        apply_method(unet, method)
    watch = CpuOps()
    out = _meta_step(unet, watch=watch)
    assert out.device.type == "meta" and out.shape == (4, 4, 8, 8)
    assert not watch.hits, "CPU tensors in a meta step:\n" + "\n".join(watch.hits[:3])


def test_the_tier_catches_host_reads_and_cpu_tensors():
    unet = _loaded()
    apply_method(unet, HostTimestep())
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        _meta_step(unet)
    unet = _loaded()
    apply_method(unet, CpuIndex())
    watch = CpuOps()
    _meta_step(unet, watch=watch)
    assert any("replace_kv" in hit for hit in watch.hits)


def test_attention_maps_are_eager_host_work_and_say_so_on_meta():
    unet = _loaded()
    apply_method(unet, AttentionMapCapture(target="style"))
    with pytest.raises((RuntimeError, NotImplementedError)):  # maps are read on the host by design
        _meta_step(unet)


def test_op_takes_meta_tensors_in_eager_mode():
    q = torch.empty(2, 300, 4, 64, device="meta", dtype=torch.float16)
    k, v = (torch.empty(2, 77, 4, 64, device="meta", dtype=torch.float16) for _ in range(2))
    ik, iv = (torch.empty(2, 4, 4, 64, device="meta", dtype=torch.float16) for _ in range(2))
    scale = torch.empty(2, device="meta")
    watch = CpuOps()
    with watch:
        out = decoupled_attention(q, k, v, [ik, ik], [iv, iv], [0.5, scale], text_bias=torch.empty(2, 77, device="meta", dtype=torch.bool))
    assert out.shape == q.shape and out.device.type == "meta" and out.dtype == torch.float16
    assert not watch.hits, watch.hits[:1]
