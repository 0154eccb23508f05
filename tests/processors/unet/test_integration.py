"""Compiled graphs, step gates, the ``blocks`` CLI and other diffusers UNets."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from instantstyle.kernels import check_close
from instantstyle.loaders import load_ip_adapter
from instantstyle.processors import FusedIPAdapterAttnProcessor, StepGate

from helpers.ip_attention import inputs, make_attn, make_pair
from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet, unet_inputs


def _counting_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def test_compiled_processor_reads_scales_and_gates_at_run_time():
    """Changing a scale (also to and from 0) or flipping a gate neither recompiles
    nor is baked into the graph."""
    torch._dynamo.reset()
    attn = make_attn(torch.float32)
    ref, ours = make_pair((4, 4), [0.5, 1.0], torch.float32)
    gate = StepGate(0.5, 1.0)
    ours.gates = [None, gate]
    attn.set_processor(ours)
    hidden, enc = inputs(adapters=((1, 4), (1, 4)), dtype=torch.float32)
    graphs = []
    compiled = torch.compile(lambda h, e: attn(h, encoder_hidden_states=e), backend=_counting_backend(graphs))

    def eager_with(scales):
        attn.set_processor(ref)
        ref.scale = scales
        with torch.no_grad():
            out = attn(hidden, encoder_hidden_states=enc)
        attn.set_processor(ours)
        return out

    with torch.no_grad():
        gate.update(999)  # early step: adapter 1 gated off
        check_close(compiled(hidden, enc), eager_with([0.5, 0.0]), "fp32")
        gate.update(100)
        check_close(compiled(hidden, enc), eager_with([0.5, 1.0]), "fp32")
        ours.scale[0] = 0.0  # what set_ip_adapter_scale does
        check_close(compiled(hidden, enc), eager_with([0.0, 1.0]), "fp32")
        ours.scale[0] = 0.75
        check_close(compiled(hidden, enc), eager_with([0.75, 1.0]), "fp32")
    assert len(graphs) == 1
    torch._dynamo.reset()


def test_step_gate_range_follows_comfyui_percentages():
    gate = StepGate(0.2, 0.8)
    lo, hi = gate.timestep_range()
    assert (lo, hi) == pytest.approx((0.2 * 999, 0.8 * 999))
    for t, is_open in [(999, 0.0), (799, 1.0), (200, 1.0), (199, 0.0), (0, 0.0)]:
        gate.update(torch.tensor(t))
        assert float(gate.value) == is_open, t
    gate.update(torch.tensor([500.0, 500.0]))  # per-sample timesteps of one step
    assert float(gate.value) == 1.0
    assert StepGate().always_open
    with pytest.raises(ValueError, match=r"start_at: expected a fraction .* got 1.5"):
        StepGate(1.5)
    with pytest.raises(TypeError, match="end_at: expected a number"):
        StepGate(0.0, "1")


def test_blocks_cli_json(capsys):
    from instantstyle.cli import main

    assert main(["blocks", "--arch", "sdxl", "--preset", "style", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 140 and {"name", "kind", "injected"} <= set(rows[0])
    injected = [r["name"] for r in rows if r["injected"]]
    assert injected == [f"up_blocks.0.attentions.1.transformer_blocks.{i}.attn2.processor" for i in range(10)]
    assert {r["kind"] for r in rows} == {"self", "cross"}
    row = next(r for r in rows if r["name"] == injected[0])
    assert (row["heads"], row["head_dim"], row["queries"]) == (20, 64, 1024)


def test_blocks_cli_table_and_errors(capsys):
    from instantstyle.cli import main

    assert main(["blocks", "--arch", "sd15", "--preset", "style+layout", "--cross-only"]) == 0
    out = capsys.readouterr().out
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.processor" in out
    assert "IP weights in 6 of 16 cross-attention layers" in out
    assert main(["blocks", "--arch", "sd15", "--preset", "stlye"]) == 2
    assert "unknown preset 'stlye'" in capsys.readouterr().err


def test_motion_unet_keeps_motion_modules_and_diffusers_key_ids():
    from diffusers import MotionAdapter, UNetMotionModel

    unet = tiny_unet("sd15")
    adapter = MotionAdapter(block_out_channels=(16, 16, 32, 32), motion_layers_per_block=2, motion_norm_num_groups=8, motion_num_attention_heads=2)
    motion = UNetMotionModel.from_unet2d(unet, adapter)
    ckpt = random_checkpoint(unet, seed=4)
    ref = copy.deepcopy(motion)
    ref._load_ip_adapter_weights([ckpt])
    ours = copy.deepcopy(motion)
    report = load_ip_adapter(ours, ckpt, target="all")
    assert len(report.adapters[0].layers) == 16
    before = motion.attn_processors
    for name, proc in ours.attn_processors.items():
        if "motion_modules" in name:
            assert type(proc) is type(before[name]) and not hasattr(proc, "to_k_ip")
        elif isinstance(proc, FusedIPAdapterAttnProcessor):
            theirs = ref.attn_processors[name]
            assert torch.equal(proc.to_k_ip[0].weight, theirs.to_k_ip[0].weight), name
            assert torch.equal(proc.to_v_ip[0].weight, theirs.to_v_ip[0].weight), name


def test_pipeline_with_controlnet_only_touches_the_unet():
    from diffusers import ControlNetModel

    unet = tiny_unet("sd15")
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3)

    class Pipe:  # what load_ip_adapter reads of a ControlNet pipeline
        pass

    pipe = Pipe()
    pipe.unet, pipe.controlnet = copy.deepcopy(unet), controlnet
    before = {n: type(p) for n, p in controlnet.attn_processors.items()}
    load_ip_adapter(pipe, random_checkpoint(unet, seed=5), target="style")
    assert {n: type(p) for n, p in controlnet.attn_processors.items()} == before
    assert sum(isinstance(p, FusedIPAdapterAttnProcessor) and len(p.to_k_ip) > 0 for p in pipe.unet.attn_processors.values()) == 3


@pytest.mark.slow  # torch.compile of a whole UNet
def test_compiled_unet_one_graph_across_gate_flips_and_scale_changes():
    from diffusers.loaders import IPAdapterMixin

    class Pipe(IPAdapterMixin):
        def __init__(self, unet):
            self.unet = unet

    torch._dynamo.reset()
    unet = copy.deepcopy(tiny_unet("sd15"))
    load_ip_adapter(unet, random_checkpoint(unet, seed=6), target="style+layout", start_at=0.3, end_at=0.9)
    graphs = []
    compiled = torch.compile(unet, backend=_counting_backend(graphs), fullgraph=True)
    kwargs = unet_inputs(unet)
    kwargs["added_cond_kwargs"] = {"image_embeds": [image_embeds(2, 1, seed=7)]}
    outputs, compiled_after_first_call = [], []
    with torch.no_grad():
        for t, scale in [(999, 1.0), (500, 1.0), (500, 0.0), (500, 0.5)]:
            Pipe(unet).set_ip_adapter_scale(scale)
            kwargs["timestep"] = torch.tensor(t)
            got = compiled(**kwargs).sample
            check_close(got, unet(**kwargs).sample, "fp32")
            outputs.append(got)
            compiled_after_first_call.append(len(graphs))
    # the gate hook and the forward are two frames, compiled once each, never again
    assert compiled_after_first_call == [2, 2, 2, 2]
    # at t=999 the gate (0.3..0.9 of the schedule) is closed: as if the scale were 0
    Pipe(unet).set_ip_adapter_scale(0.0)
    kwargs["timestep"] = torch.tensor(999)
    with torch.no_grad():
        check_close(outputs[0], unet(**kwargs).sample, "fp32")
    assert (outputs[1] - outputs[2]).abs().max() > 1e-3
    torch._dynamo.reset()
