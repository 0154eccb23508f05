"""CUDA-graph capture and replay of a whole tiny-UNet step with IP-Adapter (gated) and
editing methods attached: new scales, a new timestep (gates flip) and new embeddings
written into the captured tensors must reach the replay.  Marked ``gpu`` (skipped
without CUDA); the meta-device tier (test_meta_device.py) checks the same forward on CPU
for host reads and CPU tensors, the two things that break capture."""
from __future__ import annotations

import pytest
import torch
from diffusers.loaders import IPAdapterMixin

from instantstyle.kernels import check_close
from instantstyle.loaders import load_ip_adapter
from instantstyle.processors.methods import StyleAligned, VisualStylePrompting, apply_method

from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet, unet_inputs
from helpers.method_cases import FloatStream

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


class Pipe(IPAdapterMixin):
    def __init__(self, unet):
        self.unet = unet


def test_cuda_graph_replays_a_unet_step_with_ip_and_methods():
    unet = tiny_unet("sdxl").cuda()
    load_ip_adapter(unet, random_checkpoint(unet, seed=3), target="style+layout", start_at=0.3)
    for method in (StyleAligned(end_at=0.8), VisualStylePrompting(), FloatStream(start_at=0.1)):
        apply_method(unet, method)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in unet_inputs(unet, batch=4).items()}
    kwargs["added_cond_kwargs"] = {k: v.cuda() for k, v in kwargs["added_cond_kwargs"].items()}
    kwargs["added_cond_kwargs"]["image_embeds"] = [image_embeds(4, 1, seed=7).cuda()]
    kwargs["timestep"] = torch.tensor(500, device="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            unet(**kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = unet(**kwargs).sample

    changes = [
        lambda: Pipe(unet).set_ip_adapter_scale(0.3),
        lambda: kwargs["timestep"].fill_(950),  # IP gate and StyleAligned's gate flip
        lambda: kwargs["added_cond_kwargs"]["image_embeds"][0].copy_(image_embeds(4, 1, seed=8).cuda()),
    ]
    for change in changes:
        change()
        graph.replay()
        with torch.no_grad():
            expected = unet(**kwargs).sample
        check_close(static_out, expected, "fp32")
