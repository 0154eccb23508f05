"""``set_image_scale``: per-block control and step gates of Wan's native image branch."""
import copy

import pytest
import torch

import instantstyle
from instantstyle.processors import image_scales, set_image_scale

TOL = 1e-10


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _scaled_reference(model, scales: dict):
    """diffusers with block i's add_v_proj (weight and bias) times scales[i]: the image branch is linear in V."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, s in scales.items():
            ref.blocks[i].attn2.add_v_proj.weight.mul_(s)
            ref.blocks[i].attn2.add_v_proj.bias.mul_(s)
    return ref


def _close(a, b):
    return (a - b).abs().max().item() <= TOL * b.abs().max().item()


@pytest.mark.parametrize("family", ["wan", "skyreels", "chronoedit"])
def test_targeted_scale_equals_diffusers_with_scaled_add_v_proj(family, request, wan_inputs):
    model = request.getfixturevalue(family)
    ref = _forward(_scaled_reference(model, {1: 0.3}), wan_inputs)
    scales = set_image_scale(model, 0.3, target="blocks.1")
    assert scales == {"blocks.0.attn2.processor": 1.0, "blocks.1.attn2.processor": 0.3, "blocks.2.attn2.processor": 1.0}
    assert _close(_forward(model, wan_inputs), ref)


@pytest.mark.parametrize("scale, expected", [
    (0.5, {0: 0.5, 1: 0.5, 2: 0.5}),
    ([2.0, 0.0, -0.5], {0: 2.0, 1: 0.0, 2: -0.5}),
    ({2: 1.5}, {0: 1.0, 1: 1.0, 2: 1.5}),
])
def test_float_list_and_dict_scales(wan, wan_inputs, scale, expected):
    ref = _forward(_scaled_reference(wan, expected), wan_inputs)
    set_image_scale(wan, scale)
    assert {s: v for s, (v, _) in image_scales(wan).items()} == {f"blocks.{i}.attn2.processor": v for i, v in expected.items()}
    assert _close(_forward(wan, wan_inputs), ref)


def test_each_call_describes_the_whole_model(wan, wan_inputs):
    set_image_scale(wan, 0.0)
    set_image_scale(wan, 0.5, target="all")
    set_image_scale(wan, 2.0, target=["blocks.0"])  # untargeted blocks go back to 1
    assert [v for v, _ in image_scales(wan).values()] == [2.0, 1.0, 1.0]
    registry_dict = set_image_scale(wan, 0.5, target={"blocks": {2: 1.0}})  # a registry dict target: weight x scale
    assert list(registry_dict.values()) == [1.0, 1.0, 0.5]


def _hook_projections(model):
    fired = []
    for i, block in enumerate(model.blocks):
        for name in ("add_k_proj", "add_v_proj"):
            getattr(block.attn2, name).register_forward_hook(lambda m, a, o, i=i, name=name: fired.append((i, name)))
    return fired


def test_scale_zero_skips_the_image_branch_projections_included(wan, wan_inputs):
    ref_all_off = _forward(_scaled_reference(wan, {0: 0.0, 1: 0.0, 2: 0.0}), wan_inputs)
    fired = _hook_projections(wan)
    set_image_scale(wan, 0.0, target="blocks.1")
    _forward(wan, wan_inputs)
    assert sorted(fired) == [(0, "add_k_proj"), (0, "add_v_proj"), (2, "add_k_proj"), (2, "add_v_proj")]
    fired.clear()
    set_image_scale(wan, 0.0)
    out = _forward(wan, wan_inputs)
    assert fired == []  # no block ran add_k_proj / add_v_proj
    assert _close(out, ref_all_off)


def test_gates_open_and_close_by_step(wan, wan_inputs):
    """start_at 0.5: open for the second half of the schedule, t <= 500 of Wan's [0, 1000]."""
    late = dict(wan_inputs, timestep=torch.tensor([300.0, 300.0], dtype=torch.float64))
    closed_ref = _forward(_scaled_reference(wan, {1: 0.0}), wan_inputs)
    open_ref = _forward(_scaled_reference(wan, {1: 2.0}), late)
    set_image_scale(wan, 2.0, target="blocks.1", start_at=0.5, end_at=1.0)
    _, gate = image_scales(wan)["blocks.1.attn2.processor"]
    assert gate is not None and image_scales(wan)["blocks.0.attn2.processor"][1] is None
    assert _close(_forward(wan, wan_inputs), closed_ref)  # t = 700: before start_at, the branch adds 0
    assert float(gate.value) == 0.0
    assert _close(_forward(wan, late), open_ref)  # t = 300: open, scale 2
    assert float(gate.value) == 1.0
    set_image_scale(wan, 1.0)  # ungated again: the hook has nothing left to update
    assert all(g is None for _, g in image_scales(wan).values())


def test_gate_value_lives_on_the_timestep_device(wan, wan_inputs):
    set_image_scale(wan, 0.5, start_at=0.2, end_at=0.8)
    _forward(wan, wan_inputs)
    _, gate = image_scales(wan)["blocks.0.attn2.processor"]
    assert gate.value.device == wan_inputs["timestep"].device and gate.value.dtype == torch.float32


@pytest.mark.parametrize("kwargs, error, argument", [
    ({"scale": "big"}, TypeError, "scale:"),
    ({"scale": True}, TypeError, "scale:"),
    ({"scale": float("nan")}, ValueError, "scale:"),
    ({"scale": [1.0, 2.0]}, ValueError, "scale:"),
    ({"scale": {7: 1.0}}, ValueError, "scale:"),
    ({"scale": [1.0, "x", 1.0]}, TypeError, "scale[1]:"),
    ({"scale": [1.0] * 3, "target": "all"}, ValueError, "target:"),
    ({"scale": 1.0, "target": "style"}, ValueError, "target:"),
    ({"scale": 1.0, "target": 3}, TypeError, "target:"),
    ({"scale": 1.0, "start_at": 1.5}, ValueError, "start_at:"),
    ({"scale": 1.0, "start_at": 0.6, "end_at": 0.5}, ValueError, "end_at:"),
])
def test_bad_input_one_line_errors_name_the_argument(wan, kwargs, error, argument):
    before = dict(wan.attn_processors)
    with pytest.raises(error) as info:
        set_image_scale(wan, **kwargs)
    assert str(info.value).startswith(argument) and "\n" not in str(info.value)
    assert wan.attn_processors == before  # nothing changed


def test_models_without_an_image_branch_are_refused():
    from diffusers import WanTransformer3DModel

    t2v = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    with pytest.raises(ValueError, match=r"^pipe_or_model: expected a Wan-family I2V"):
        set_image_scale(t2v, 0.5)
    assert instantstyle.use_fused_processors(t2v) == {}  # nothing to fuse: one softmax per layer


def test_a_foreign_processor_is_named(wan):
    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            return hidden_states

    wan.blocks[2].attn2.set_processor(Custom())
    with pytest.raises(TypeError, match=r"^pipe_or_model: layer blocks.2.attn2.processor runs a Custom"):
        set_image_scale(wan, 0.5)
    assert not hasattr(wan.blocks[0].attn2.processor, "image_scale")  # checked before anything changed
