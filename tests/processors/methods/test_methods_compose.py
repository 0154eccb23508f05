"""Several methods at once (one fused op call per layer), turning methods off, and the
extension interface itself."""
from __future__ import annotations

import copy

import pytest
import torch

import instantstyle.processors.core.engine as compose
from instantstyle.kernels import check_close
from instantstyle.loaders import load_ip_adapter
from instantstyle.processors import registry_of
from instantstyle.processors.methods import AttentionMapCapture, EditingMethod, StyleAligned, VisualStylePrompting, apply_method, remove_method
from instantstyle.processors.methods import applied_methods, reference_rows

from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet
from helpers.method_cases import (
    MutualSelfAttention,
    RefScaledSelf,
    RefSharedPromptIP,
    RefStyleAligned,
    RefVisualStylePrompting,
    run,
    share_norms,
    with_processors,
)
from helpers.unet_reference import diffusers_loaded

STYLE = {"up": {"block_0": [0.0, 1.0, 0.0]}}  # SDXL "style" as a set_ip_adapter_scale dict


class SharedPrompt(EditingMethod):
    """Test method (kind 2 in cross-attention): every image's text softmax also holds the
    first prompt's text keys of its CFG half."""

    name = "shared_prompt"
    kind = "cross"

    def joint_kv(self, call):
        rows = reference_rows(call.batch, 2)
        return call.k[rows], call.v[rows], None


class OwnEcho(EditingMethod):
    """Test method (kind 1): a decoupled stream of the layer's own K/V at ``scale``."""

    name = "own_echo"

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def streams(self, call):
        return [(call.k, call.v, self.scale)]


def _with_ip(unet, target="style"):
    ours = copy.deepcopy(unet)
    ckpt = random_checkpoint(unet, seed=1)
    load_ip_adapter(ours, ckpt, target=target)
    return ours, ckpt


def _embeds(batch=4):
    return {"added_cond_kwargs": {"image_embeds": [image_embeds(batch, 1, seed=3)]}}


def _op_calls(monkeypatch):
    """Every op call of one forward: (module, ip streams, joint keys?), checked or trusted."""
    calls = []
    checked, trusted = compose.decoupled_attention, compose.run_inputs

    def counting(*args, **kwargs):
        ip_k = args[3] if len(args) > 3 else kwargs.get("ip_k", ())
        calls.append(("pipeline", len(ip_k), kwargs.get("joint_k") is not None))
        return checked(*args, **kwargs)

    def counting_trusted(inputs, *args, **kwargs):
        calls.append(("pipeline", len(inputs.ip_k), inputs.joint_k is not None))
        return trusted(inputs, *args, **kwargs)

    monkeypatch.setattr(compose, "decoupled_attention", counting)
    monkeypatch.setattr(compose, "run_inputs", counting_trusted)
    return calls


def test_ip_adapter_plus_style_aligned_equals_both_by_hand(monkeypatch):
    unet = tiny_unet("sdxl")
    ours, ckpt = _with_ip(unet)
    apply_method(ours, StyleAligned())
    ref, _ = with_processors(diffusers_loaded(unet, [ckpt], STYLE), RefStyleAligned)
    share_norms(ref)  # StyleAligned's default shared norms, upstream-style
    expected = run(ref, dtype=torch.float64, **_embeds())
    calls = _op_calls(monkeypatch)
    got = run(ours, **_embeds())
    check_close(got, expected, "fp32")
    # one op call per attention layer: self layers carry the joint keys, IP layers their stream
    sites = registry_of(ours).sites
    assert len(calls) == len(sites)
    assert sum(1 for where, ip, joint in calls if joint) == len([s for s in sites if s.kind == "self"])
    assert sum(1 for _, ip, _ in calls if ip == 1) == 3  # the 3 layers of SDXL's style block
    # and IP-Adapter alone is really in there
    without_ip, _ = with_processors(unet, RefStyleAligned)
    share_norms(without_ip)
    assert (expected - run(without_ip, dtype=torch.float64, **_embeds())).norm() > 1e-3 * expected.norm()


@pytest.mark.parametrize("capture", [False, True])
def test_ip_streams_and_joint_keys_meet_in_one_call_at_the_same_layer(monkeypatch, capture):
    """... and with a capture there, the materialised path computes the same output."""
    unet = tiny_unet("sdxl")
    ours, ckpt = _with_ip(unet, target="style")
    style_layers = registry_of(ours).injections["ip_adapter[0]"].weights
    apply_method(ours, SharedPrompt(target="style"))
    if capture:
        maps = AttentionMapCapture(target="style")
        apply_method(ours, maps)
    ref = diffusers_loaded(unet, [ckpt], STYLE)
    ref, _ = with_processors(ref, lambda: None, kind="attn2", only=set())  # float64 copy
    for name in style_layers:
        module = dict(ref.named_modules())[name[: -len(".processor")]]
        module.set_processor(RefSharedPromptIP(module.processor))
    expected = run(ref, dtype=torch.float64, **_embeds())
    calls = _op_calls(monkeypatch)
    check_close(run(ours, **_embeds()), expected, "fp32")
    if capture:  # probabilities over [text keys; shared prompt keys], no op call at those layers
        assert not [c for c in calls if c[2]] and len(maps.maps) == len(style_layers)
        return
    assert sorted(c for c in calls if c[2]) == [("pipeline", 1, True)] * len(style_layers)


def test_extension_interface_streams_and_kinds():
    assert StyleAligned().kinds == [2, 3, 4] and VisualStylePrompting().kinds == [3]
    assert AttentionMapCapture().kinds == [5] and OwnEcho(0.5).kinds == [1] and SharedPrompt().kinds == [2]
    unet = tiny_unet("sd15")
    ref, _ = with_processors(unet, lambda: RefScaledSelf(1.5))
    ours = copy.deepcopy(unet)
    apply_method(ours, OwnEcho(0.5))
    check_close(run(ours), run(ref, dtype=torch.float64), "fp32")


def test_readme_example_masactrl_from_its_start_step():
    unet = tiny_unet("sdxl")
    layers = registry_of(unet).resolve(["up_blocks.*"], "self")
    ref, _ = with_processors(unet, RefVisualStylePrompting, only=set(layers))
    ours = copy.deepcopy(unet)
    plain = run(ours, timestep=990)
    apply_method(ours, MutualSelfAttention())  # start_at 0.08: t <= 919
    check_close(run(ours, timestep=990), plain, "fp32")
    check_close(run(ours, timestep=500), run(ref, dtype=torch.float64, timestep=500), "fp32")


@pytest.mark.slow  # whole tiny UNets
@pytest.mark.parametrize("methods", [
    [StyleAligned()],
    [StyleAligned(start_at=0.2, cfg=False, share_group_norm=False), StyleAligned(name="sa2", end_at=0.9)],
    [VisualStylePrompting()],
    [AttentionMapCapture()],
    [SharedPrompt(target="style")],
    [StyleAligned(end_at=0.7), VisualStylePrompting(), AttentionMapCapture(target="style"), SharedPrompt()],
])
def test_turning_methods_off_restores_the_model_exactly(methods):
    ours, _ = _with_ip(tiny_unet("sdxl"))
    before = dict(ours.attn_processors)
    hooks_before = list(ours._forward_pre_hooks.values())  # the loader's step hook (per-run caches), no more
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and not any("forward" in m.__dict__ for m in norms)
    expected = run(ours, **_embeds())
    for method in methods:
        apply_method(ours, method)
    shared = any(getattr(m, "share_group_norm", False) for m in methods)
    assert all(("forward" in m.__dict__) == shared for m in norms)  # StyleAligned's shared GroupNorms
    assert (run(ours, **_embeds()) - expected).abs().max() > 0 or methods[0].kinds == [5]
    for method in reversed(methods):
        remove_method(ours, method.name)
    assert torch.equal(run(ours, **_embeds()), expected)
    assert not [k for m in norms for k in m.__dict__ if k == "forward" or k.startswith("_instantstyle")]  # no patch left
    after = ours.attn_processors
    assert all(after[name] is proc for name, proc in before.items())
    assert not applied_methods(ours) and not [m for m in registry_of(ours).injections if m.startswith("method:")]
    assert list(ours._forward_pre_hooks.values()) == hooks_before


def test_removing_one_of_two_keeps_the_other():
    unet = tiny_unet("sdxl")
    only_sa = copy.deepcopy(unet)
    apply_method(only_sa, StyleAligned())
    both = copy.deepcopy(unet)
    apply_method(both, StyleAligned())
    apply_method(both, OwnEcho(0.3))
    remove_method(both, OwnEcho(0.3))  # by instance: its name
    assert torch.equal(run(both), run(only_sa))
    apply_method(both, StyleAligned(keys_scale=0.5))  # same name: replaces
    assert list(applied_methods(both)) == ["style_aligned"] and applied_methods(both)["style_aligned"].keys_scale == 0.5
    # one StyleAligned at a time shares the GroupNorms: a second is refused, the first kept
    with pytest.raises(ValueError, match="already shared by method 'style_aligned'; pass share_group_norm=False"):
        apply_method(both, StyleAligned(name="second"))
    assert list(applied_methods(both)) == ["style_aligned"]
    apply_method(both, StyleAligned(keys_scale=0.5, name="second", share_group_norm=False))
    remove_method(both, "second")
    apply_method(only_sa, StyleAligned(keys_scale=0.5))
    assert torch.equal(run(both), run(only_sa))


def test_bad_inputs_name_the_argument():
    unet = tiny_unet("sdxl")
    with pytest.raises(TypeError, match="method: expected an EditingMethod instance, got str"):
        apply_method(unet, "style_aligned")
    with pytest.raises(ValueError, match="method: 'nope' is not applied to this model"):
        remove_method(unet, "nope")
    with pytest.raises(TypeError, match="name: expected a non-empty string"):
        StyleAligned(name="")
    with pytest.raises(ValueError, match="target: unknown preset 'styel'"):
        apply_method(unet, AttentionMapCapture(target="styel"))

    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            return hidden_states

    name = next(n for n in unet.attn_processors if n.endswith("attn1.processor"))
    dict(unet.named_modules())[name[: -len(".processor")]].set_processor(Custom())
    with pytest.raises(TypeError, match="runs a Custom"):
        apply_method(unet, StyleAligned())
    assert not applied_methods(unet)

    class BadStreams(EditingMethod):
        def streams(self, call):
            return [(call.k, call.v)]

    other = tiny_unet("sd15")
    apply_method(other, BadStreams())
    with pytest.raises(ValueError, match="method.streams: expected \\(k, v, scale\\)"):
        run(other)


def test_compiled_layer_reads_the_step_gate_at_run_time():
    """A method switching on or off neither recompiles nor is baked into the graph."""
    torch._dynamo.reset()
    unet = tiny_unet("sdxl")
    method = StyleAligned(start_at=0.5)
    apply_method(unet, method)
    attn = next(s for s in registry_of(unet).sites if s.kind == "self").module
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    hidden = torch.randn(4, 16, attn.to_q.in_features)
    compiled = torch.compile(lambda h: attn(h), backend=backend)
    outs = {}
    with torch.no_grad():
        for timestep in (900, 100, 900, 100):
            method.gate.update(timestep)
            outs[timestep] = compiled(hidden)
            check_close(outs[timestep], attn(hidden), "fp32")
    assert (outs[900] - outs[100]).abs().max() > 1e-4
    assert len(graphs) == 1
    torch._dynamo.reset()


def test_loading_an_adapter_after_a_method_is_not_undone_by_removing_it():
    unet = tiny_unet("sdxl")
    apply_method(unet, AttentionMapCapture())
    load_ip_adapter(unet, random_checkpoint(unet, seed=1), target="style")  # replaces every cross processor
    loaded = dict(unet.attn_processors)
    remove_method(unet, "attention_maps")
    assert all(unet.attn_processors[name] is proc for name, proc in loaded.items())
