"""The Wan-family processors against diffusers' own: Wan 2.1 I2V, SkyReels-V2 and ChronoEdit
transformers (whole forward, float64), a Wan-Animate layer, fused projections, masks, short
contexts, per-run caches, subclassing."""
import copy

import pytest
import torch
from diffusers.models.transformers import transformer_wan, transformer_wan_animate

import instantstyle
from instantstyle.processors import FusedWanAnimateAttnProcessor, FusedWanAttnProcessor
from instantstyle.processors.core.step_cache import one_run
from instantstyle.processors.wan import layer as wan_layer
from instantstyle.processors.wan.processor import WAN_CLASSES

TOL = 1e-10


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("family", ["wan", "skyreels", "chronoedit"])
def test_float64_parity_with_diffusers(family, request, wan_inputs):
    model = request.getfixturevalue(family)
    ref = _forward(model, wan_inputs)
    replaced = instantstyle.use_fused_processors(model)
    assert sorted(replaced) == [f"blocks.{i}.attn2.processor" for i in range(3)]
    for block in model.blocks:
        assert isinstance(block.attn2.processor, WAN_CLASSES)
        assert isinstance(block.attn2.processor, type(replaced["blocks.0.attn2.processor"]))  # subclasses diffusers' class
        assert not isinstance(block.attn1.processor, WAN_CLASSES)  # self-attention stays diffusers'
    out = _forward(model, wan_inputs)
    assert (out - ref).abs().max().item() <= TOL * ref.abs().max().item()
    assert instantstyle.use_fused_processors(model) == {}  # idempotent


def test_each_cross_attention_layer_is_one_op_call(wan, wan_inputs, monkeypatch):
    from instantstyle.processors.core import engine

    calls = []
    original = engine._trusted_streams
    monkeypatch.setattr(engine, "_trusted_streams", lambda call, entries: calls.append(len(entries)) or original(call, entries))
    instantstyle.use_fused_processors(wan)
    _forward(wan, wan_inputs)
    assert calls == [1, 1, 1]  # one op call per attn2, the image branch as its one stream


def test_fused_projections_parity(wan, wan_inputs):
    ref = _forward(wan, wan_inputs)
    instantstyle.use_fused_processors(wan)
    wan.fuse_qkv_projections()
    assert wan.blocks[0].attn2.fused_projections
    out = _forward(wan, wan_inputs)
    assert (out - ref).abs().max().item() <= TOL * ref.abs().max().item()


def _layer(module=transformer_wan, image=True):
    torch.manual_seed(3)
    attn = module.WanAttention(dim=24, heads=2, dim_head=12, eps=1e-6, added_kv_proj_dim=24 if image else None,
                               cross_attention_dim_head=12, processor=module.WanAttnProcessor()).double()
    for norm in (attn.norm_q, attn.norm_k) + ((attn.norm_added_k,) if image else ()):
        norm.weight.data.uniform_(0.5, 1.5)
    return attn


def _both(attn, fused, *args):
    with torch.no_grad():
        ref = attn(*args)
        ours_attn = copy.deepcopy(attn)
        ours_attn.set_processor(fused)
        return ref, ours_attn(*args)


@pytest.mark.parametrize("context_len", [512 + 257, 512 + 514, 20])
def test_layer_parity_image_lengths_and_short_context(context_len):
    """257 (I2V) and 514 (FLF2V) image tokens; a context shorter than 512 splits as diffusers splits it (empty image part)."""
    attn = _layer()
    x, ctx = torch.randn(2, 10, 24, dtype=torch.float64), torch.randn(2, context_len, 24, dtype=torch.float64)
    ref, out = _both(attn, FusedWanAttnProcessor(), x, ctx)
    assert (out - ref).abs().max().item() <= TOL


def test_wan_animate_layer_parity():
    attn = _layer(transformer_wan_animate)
    x, ctx = torch.randn(2, 10, 24, dtype=torch.float64), torch.randn(2, 512 + 7, 24, dtype=torch.float64)
    ref, out = _both(attn, FusedWanAnimateAttnProcessor(), x, ctx)
    assert (out - ref).abs().max().item() <= TOL


def test_attention_mask_takes_the_unfused_path_with_diffusers_math():
    attn = _layer()
    x, ctx = torch.randn(2, 10, 24, dtype=torch.float64), torch.randn(2, 512 + 4, 24, dtype=torch.float64)
    mask = torch.ones(2, 1, 1, 512, dtype=torch.bool)
    mask[:, ..., 300:] = False
    proc = FusedWanAttnProcessor()
    ref, out = _both(attn, proc, x, ctx, mask)
    assert (out - ref).abs().max().item() <= TOL
    assert proc.fallback_reason.startswith("attention_mask of shape (2, 1, 1, 512)")


def test_self_attention_and_text_only_layers_run_diffusers_code(monkeypatch):
    called = []
    original = transformer_wan.WanAttnProcessor.__call__
    monkeypatch.setattr(transformer_wan.WanAttnProcessor, "__call__", lambda *a, **k: called.append(1) or original(*a, **k))
    attn = _layer(image=False)
    x, ctx = torch.randn(2, 10, 24, dtype=torch.float64), torch.randn(2, 30, 24, dtype=torch.float64)
    ref = original(transformer_wan.WanAttnProcessor(), attn, x, ctx)
    attn.set_processor(FusedWanAttnProcessor())
    with torch.no_grad():
        assert torch.equal(attn(x, ctx), ref)
    assert called == [1]


def test_per_run_caches_reuse_kv_and_see_in_place_edits(monkeypatch):
    attn = _layer()
    attn.set_processor(FusedWanAttnProcessor())
    x, ctx = torch.randn(2, 10, 24, dtype=torch.float64), torch.randn(2, 512 + 4, 24, dtype=torch.float64)
    projected = []
    real = wan_layer.linear
    monkeypatch.setattr(wan_layer, "linear", lambda m, t: projected.append(m) or real(m, t))
    with torch.no_grad():
        first = attn(x, ctx)
        assert len(projected) == 6  # q, text k/v, image k/v, out: nothing is cached outside a run
        with one_run():
            projected.clear()
            attn(x, ctx)
            assert len(projected) == 6
            projected.clear()
            assert torch.equal(attn(x, ctx), first)
            assert projected == [attn.to_q, attn.to_out[0]]  # text and image K/V reused
            attn.add_v_proj.weight.mul_(2.0)  # an autograd-visible edit inside the run
            projected.clear()
            assert not torch.equal(attn(x, ctx), first)
            assert attn.add_v_proj in projected and attn.to_k not in projected


def test_subclassing_our_processor():
    class Counting(FusedWanAttnProcessor):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            self.calls += 1
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    proc = Counting()
    assert isinstance(proc, transformer_wan.WanAttnProcessor)
    assert list(Counting.bound_call_signature.parameters)[:2] == ["attn", "hidden_states"]
    attn = _layer()
    x, ctx = torch.randn(2, 10, 24, dtype=torch.float64), torch.randn(2, 512 + 4, 24, dtype=torch.float64)
    ref, out = _both(attn, proc, x, ctx)
    assert proc.calls == 1 and (out - ref).abs().max().item() <= TOL
    proc.image_scale = 0.0
    assert proc.gates == [] and proc.image_scale == 0.0
