"""Drop-in: diffusers' model APIs that reset, rebuild or copy processors behave with ours
installed as they do with diffusers' own, and our state survives what users do.

``ref`` is always the same UNet with diffusers' own loader and processors (scales set
to the same targets with ``set_ip_adapter_scale``), so "behaves as diffusers" is a
comparison made in the test, not an opinion."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from diffusers.loaders import IPAdapterMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from instantstyle.kernels import check_close
from instantstyle.loaders import load_ip_adapter
from instantstyle.processors import FusedAttnProcessor, FusedIPAdapterAttnProcessor, registry_of
from instantstyle.processors.methods import AttentionMapCapture, StyleAligned, apply_method, applied_methods, remove_method

from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet, unet_inputs

pytestmark = pytest.mark.slow  # whole tiny UNets through diffusers' model APIs, ours and diffusers'

STYLE = {"up": {"block_0": [0.0, 1.0, 0.0]}}


class Pipe(IPAdapterMixin):
    def __init__(self, unet):
        self.unet = unet


def forward(unet, ip=True, timestep=500, batch=2, seed=0):
    kwargs = unet_inputs(unet, batch=batch, seed=seed)
    kwargs["timestep"] = torch.tensor(timestep)
    if ip:
        kwargs["added_cond_kwargs"]["image_embeds"] = [image_embeds(batch, 1, seed=7)]
    with torch.no_grad():
        return unet(**kwargs).sample


def outcome(fn, *args):
    """``("ok", value)`` or ``("error", exception type)``."""
    try:
        return "ok", fn(*args)
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return "error", type(exc)


def pair(**load):
    """(ours: targeted load, ref: diffusers' loader with the same effective scales)."""
    unet = tiny_unet("sdxl")
    ckpt = random_checkpoint(unet, seed=3)
    ours = copy.deepcopy(unet)
    load_ip_adapter(ours, ckpt, target="style", **load)
    ref = copy.deepcopy(unet)
    ref._load_ip_adapter_weights([ckpt])
    Pipe(ref).set_ip_adapter_scale(STYLE)
    return ours, ref, unet


def same_result(a, b):
    assert a[0] == b[0], (a, b)
    if a[0] == "ok":
        check_close(a[1], b[1], "fp32")
    else:
        assert a[1] is b[1]


# -- diffusers' model APIs -----------------------------------------------------------------
@pytest.mark.parametrize("ip", [True, False])
def test_set_default_attn_processor_as_with_diffusers_own(ip):
    ours, ref, _ = pair()
    apply_method(ours, StyleAligned())
    for unet in (ours, ref):
        unet.set_default_attn_processor()  # raised ValueError with our classes
    assert {type(p).__name__ for p in ours.attn_processors.values()} == {"AttnProcessor"}
    same_result(outcome(forward, ours, ip), outcome(forward, ref, ip))
    with warnings.catch_warnings(record=True):
        assert applied_methods(ours) == {}  # the method went with its layers, fully
    assert not [m for m in ours.modules() if "forward" in m.__dict__]  # GroupNorms unpatched


def test_unload_ip_adapter_gives_back_plain_processors_everywhere():
    ours, ref, plain = pair(start_at=0.2)
    for unet in (ours, ref):
        Pipe(unet).unload_ip_adapter()
    assert {n: type(p) for n, p in ours.attn_processors.items()} == {n: type(p) for n, p in ref.attn_processors.items()}
    check_close(forward(ours, ip=False), forward(plain, ip=False), "fp32")
    assert registry_of(ours).injections == {}
    forward(ours, ip=False)
    assert not ours._forward_pre_hooks  # the step hook went with the last gate


@pytest.mark.parametrize("load", [dict(start_at=0.3, end_at=0.9), dict()])
def test_disable_xformers_keeps_our_processors_targets_scales_and_gates(load):
    ours, ref, _ = pair(**load)
    before = forward(ours), forward(ours, timestep=999)
    ours.disable_xformers_memory_efficient_attention()  # raised "Missing key(s)" for partial layers
    ref.disable_xformers_memory_efficient_attention()
    assert all(isinstance(p, FusedIPAdapterAttnProcessor) for n, p in ours.attn_processors.items() if n.endswith("attn2.processor"))
    check_close(forward(ours), before[0], "fp32")
    check_close(forward(ours, timestep=999), before[1], "fp32")  # gate closed at t=999 when start_at=0.3
    if not load:
        check_close(forward(ours), forward(ref), "fp32")


def test_enable_xformers_fails_as_diffusers_does_and_changes_nothing():
    ours, ref, _ = pair()
    procs = dict(ours.attn_processors)
    same_result(outcome(ours.enable_xformers_memory_efficient_attention), outcome(ref.enable_xformers_memory_efficient_attention))
    assert all(ours.attn_processors[n] is p for n, p in procs.items())


def test_fuse_and_unfuse_qkv_projections_as_with_diffusers_own():
    ours, ref, _ = pair()
    expected = forward(ours)
    for unet in (ours, ref):
        unet.fuse_qkv_projections()
    same_result(outcome(forward, ours), outcome(forward, ref))
    for unet in (ours, ref):
        unet.unfuse_qkv_projections()
    check_close(forward(ours), expected, "fp32")
    check_close(forward(ref), expected, "fp32")


def test_motion_model_from_a_targeted_unet_keeps_weights_scales_and_gates():
    from diffusers import UNetMotionModel

    ours, _, _ = pair(end_at=0.5)
    motion = UNetMotionModel.from_unet2d(ours)  # AttributeError 'hidden_size' / strict load before
    src = ours.attn_processors
    for name, proc in motion.attn_processors.items():
        if name in src and isinstance(src[name], FusedIPAdapterAttnProcessor):
            assert isinstance(proc, FusedIPAdapterAttnProcessor) and proc is not src[name]
            assert proc.adapter_ids == src[name].adapter_ids and list(proc.scale) == list(src[name].scale)
            for a, b in zip(proc.to_k_ip.parameters(), src[name].to_k_ip.parameters()):
                assert torch.equal(a, b)
            assert proc.gates[0] is not None and proc.gates[0].end_at == 0.5
    assert motion.config.encoder_hid_dim_type == "ip_image_proj"
    assert {type(p) for p in ours.attn_processors.values()} == {type(p) for p in src.values()}  # source untouched


def test_save_and_load_pretrained_as_with_diffusers_own(tmp_path):
    from diffusers import UNet2DConditionModel

    ours, ref, _ = pair()
    results = []
    for name, unet in (("ours", ours), ("ref", ref)):
        unet.save_pretrained(tmp_path / name)
        results.append(outcome(lambda p: forward(UNet2DConditionModel.from_pretrained(p), ip=False), tmp_path / name))
    same_result(*results)


# -- state that survives what users do ---------------------------------------------------------
@pytest.mark.parametrize("copier", [
    copy.deepcopy,
    lambda m: pickle.loads(pickle.dumps(m)),
    lambda m: torch.load(io.BytesIO(_saved(m)), weights_only=False),
])
def test_scale_changes_reach_a_copied_model(copier):
    ours, _, plain = pair()
    copied = copier(ours)
    Pipe(copied).set_ip_adapter_scale(0.3)  # silently did nothing on a copy
    fresh = copy.deepcopy(plain)
    load_ip_adapter(fresh, random_checkpoint(plain, seed=3), target="style", scale=0.3)
    check_close(forward(copied), forward(fresh), "fp32")
    assert (forward(copied) - forward(ours)).abs().max() > 1e-4  # and the original kept its own


def _saved(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def test_scale_set_while_a_method_is_attached_survives_its_removal():
    ours, _, plain = pair()
    apply_method(ours, StyleAligned())
    Pipe(ours).set_ip_adapter_scale(0.3)
    remove_method(ours, "style_aligned")  # restored the old processor objects, undoing the scale
    fresh = copy.deepcopy(plain)
    load_ip_adapter(fresh, random_checkpoint(plain, seed=3), target="style", scale=0.3)
    check_close(forward(ours), forward(fresh), "fp32")


def test_unload_with_methods_attached_leaves_nothing_half_applied():
    ours, _, plain = pair()
    apply_method(ours, StyleAligned())  # self-attention: survives unload, fully
    apply_method(ours, AttentionMapCapture(target="style"))  # cross-attention: goes, fully
    Pipe(ours).unload_ip_adapter()
    with pytest.warns(UserWarning, match="attention_maps"):
        assert sorted(applied_methods(ours)) == ["style_aligned"]
    only_sa = copy.deepcopy(plain)
    apply_method(only_sa, StyleAligned())
    check_close(forward(ours, ip=False, batch=4), forward(only_sa, ip=False, batch=4), "fp32")
    assert sorted(registry_of(ours).injections) == ["method:style_aligned"]
    remove_method(ours, "style_aligned")
    assert not [m for m in ours.modules() if "forward" in m.__dict__]
    check_close(forward(ours, ip=False, batch=4), forward(plain, ip=False, batch=4), "fp32")


def test_registry_reads_the_layers_after_set_attn_processor():
    ours, _, _ = pair()
    assert sorted(registry_of(ours).injections) == ["ip_adapter[0]"]
    ours.set_attn_processor(AttnProcessor2_0())
    assert registry_of(ours).injections == {}


def test_attention_maps_are_scoped_to_one_run():
    unet = tiny_unet("sdxl")
    capture = AttentionMapCapture(target="style", steps=[1])
    apply_method(unet, capture)

    def run(seed):  # one "pipeline call": timesteps fall
        for t in (900, 600, 300):
            forward(unet, ip=False, timestep=t, seed=seed)
        return {k: v.clone() for k, v in capture.maps.items()}

    first, second = run(0), run(1)
    assert sorted(first) == sorted(second) and all(step == 1 for step, _ in second)
    assert all((first[k] - second[k]).abs().max() > 0 for k in first)  # the second prompt's maps
    every = AttentionMapCapture(target="style", name="every")
    apply_method(unet, every)
    run(0)
    size = len(every.maps)
    run(1)
    assert len(every.maps) == size == 3 * len(capture.maps)  # no growth across calls


# -- every Attention option -------------------------------------------------------------------------
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("options", [
    dict(qk_norm="layer_norm"),
    dict(qk_norm="rms_norm", residual_connection=True, rescale_output_factor=2.0),
    dict(norm_num_groups=4, residual_connection=True),
])
def test_fused_processor_honours_attention_options(cross, options):
    attn = Attention(query_dim=16, cross_attention_dim=12 if cross else None, heads=2, dim_head=8, **options).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # norms away from identity
    x = torch.randn(2, 16, 3, 3) if "norm_num_groups" in options else torch.randn(2, 9, 16)
    context = torch.randn(2, 5, 12) if cross else None
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(x, encoder_hidden_states=context)
        attn.set_processor(FusedAttnProcessor())
        got = attn(x, encoder_hidden_states=context)
    check_close(got, expected, "fp32")


def test_diffusers_ip_processor_class_is_still_recognised():
    ours, _, _ = pair()
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) for n, p in ours.attn_processors.items() if n.endswith("attn2.processor"))


# -- the host-overhead shortcuts stay exact and respect what they skip ---------------------------
def test_projections_still_go_through_hooks_and_lora_like_modules():
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x, context = torch.randn(2, 9, 16), torch.randn(2, 5, 12)
    attn.set_processor(FusedAttnProcessor())
    with torch.no_grad():
        plain = attn(x, encoder_hidden_states=context)
        seen = []
        handle = attn.to_k.register_forward_hook(lambda m, i, o: seen.append(o.shape) or o * 2)
        hooked = attn(x, encoder_hidden_states=context)
        handle.remove()

        class Doubled(torch.nn.Linear):  # a LoRA-style replacement of the projection
            def forward(self, h):
                return super().forward(h) * 2

        doubled = Doubled(12, 16, bias=False)
        doubled.load_state_dict(attn.to_k.state_dict())
        attn.to_k = doubled
        replaced = attn(x, encoder_hidden_states=context)
    assert seen == [(2, 5, 16)]
    check_close(hooked, replaced, "fp32")
    assert (hooked - plain).abs().max() > 1e-3


def test_processor_call_keeps_its_signature_and_binding_through_copies():
    import inspect

    proc = FusedIPAdapterAttnProcessor(16, 12, num_tokens=(4,), scale=0.5)
    expected = list(inspect.signature(IPAdapterAttnProcessor2_0.__call__).parameters)[1:]
    for candidate in (proc, copy.deepcopy(proc), pickle.loads(pickle.dumps(proc))):
        assert list(inspect.signature(candidate.__call__).parameters) == expected
        assert candidate.__call__.processor is candidate
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x, context = torch.randn(2, 9, 16), (torch.randn(2, 5, 12), [torch.randn(2, 1, 4, 12)])
    with torch.no_grad():
        check_close(proc.__call__(attn, x, context), proc(attn, x, context), "fp32")


def test_a_scale_list_of_the_wrong_length_is_refused_and_changes_nothing():
    proc = FusedIPAdapterAttnProcessor(16, 12, num_tokens=(4, 16), scale=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"scale: expected one entry per IP-Adapter \(2\), got 3"):
        proc.scale = [0.5, 0.5, 0.5]
    assert list(proc.scale) == [0.5, 1.0] and proc.scale_values[:, 0].tolist() == [0.5, 1.0]


def test_disable_xformers_with_target_all_keeps_the_gates():
    unet = tiny_unet("sdxl")
    ours = copy.deepcopy(unet)
    load_ip_adapter(ours, random_checkpoint(unet, seed=3), target="all", start_at=0.3)  # closed at t=999
    ours.disable_xformers_memory_efficient_attention()  # dropped the gates before
    check_close(forward(ours, timestep=999), forward(unet, timestep=999, ip=False), "fp32")
    assert (forward(ours) - forward(unet, ip=False)).abs().max() > 1e-4  # open at t=500
