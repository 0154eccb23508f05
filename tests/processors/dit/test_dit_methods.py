"""Attention-map capture on Flux/SD3 joint attention, against a float64 by-hand reference
built from the layers' own weights; outputs unchanged; what DiTs refuse."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from instantstyle.processors.methods import AttentionMapCapture, EditingMethod, StyleAligned, apply_method, remove_method

from helpers.dit_fixtures import embeds, flux_inputs, sd3_inputs, tiny_flux, tiny_sd3, xlabs_state


def _record_inputs(model, prefix):
    """Each joint attention module's call kwargs (hidden and text states, RoPE)."""
    seen = {}
    for name, module in model.named_modules():
        if name.startswith(prefix) and name.endswith(".attn"):
            module.register_forward_pre_hook(lambda m, a, kw, name=name: seen.__setitem__(name, (a, kw)), with_kwargs=True)
    return seen


def _heads(x, heads):
    return x.unflatten(-1, (heads, -1))


def flux_map(attn, kw):
    """Image rows x text columns of the joint softmax, head-averaged: (B, Lt, h, w)."""
    hs, ehs, rope = kw["hidden_states"], kw["encoder_hidden_states"], kw["image_rotary_emb"]
    q = attn.norm_q(_heads(attn.to_q(hs), attn.heads))
    k = attn.norm_k(_heads(attn.to_k(hs), attn.heads))
    eq = attn.norm_added_q(_heads(attn.add_q_proj(ehs), attn.heads))
    ek = attn.norm_added_k(_heads(attn.add_k_proj(ehs), attn.heads))
    q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    probs = (torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5).softmax(-1)
    lt = ehs.shape[1]
    text = probs[:, :, lt:, :lt].mean(1)  # (B, N, Lt)
    side = int(text.shape[1] ** 0.5)
    return text.transpose(1, 2).reshape(text.shape[0], lt, side, side)


def flux_single_map(attn, kw, lt):
    """The same for a single-stream block: its one sequence is [text ; image]."""
    hs, rope = kw["hidden_states"], kw["image_rotary_emb"]
    q = apply_rotary_emb(attn.norm_q(_heads(attn.to_q(hs), attn.heads)), rope, sequence_dim=1)
    k = apply_rotary_emb(attn.norm_k(_heads(attn.to_k(hs), attn.heads)), rope, sequence_dim=1)
    probs = (torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5).softmax(-1)
    text = probs[:, :, lt:, :lt].mean(1)
    side = int(text.shape[1] ** 0.5)
    return text.transpose(1, 2).reshape(text.shape[0], lt, side, side)


def sd3_map(attn, args, kw):
    hs, ehs = kw.get("hidden_states", args[0] if args else None), kw["encoder_hidden_states"]
    q = attn.norm_q(_heads(attn.to_q(hs), attn.heads))
    k = attn.norm_k(_heads(attn.to_k(hs), attn.heads))
    eq = attn.norm_added_q(_heads(attn.add_q_proj(ehs), attn.heads))
    ek = attn.norm_added_k(_heads(attn.add_k_proj(ehs), attn.heads))
    q, k = torch.cat([q, eq], 1), torch.cat([k, ek], 1)  # SD3: image first
    probs = (torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5).softmax(-1)
    n = hs.shape[1]
    text = probs[:, :, :n, n:].mean(1)
    side = int(n ** 0.5)
    return text.transpose(1, 2).reshape(text.shape[0], -1, side, side)


def test_flux_maps_match_by_hand_at_double_blocks_and_outputs_are_unchanged():
    model = tiny_flux()
    model._load_ip_adapter_weights([xlabs_state(model)], low_cpu_mem_usage=False)  # IP layers capture too
    model.to(torch.float64)
    ip = {"joint_attention_kwargs": {"ip_adapter_image_embeds": [embeds(2, 1, 32)]}}
    with torch.no_grad():
        ref = model(**flux_inputs(), **ip).sample
    plain = tiny_flux()
    with torch.no_grad():
        plain_ref = plain(**flux_inputs()).sample
    for m, expected, kwargs in ((model, ref, ip), (plain, plain_ref, {})):
        capture = AttentionMapCapture()
        injection = apply_method(m, capture)
        double = [f"transformer_blocks.{i}.attn.processor" for i in range(2)]
        single = [n for n in m.attn_processors if n.startswith("single_transformer_blocks.")]
        assert sorted(injection.weights) == sorted(double + single)  # single blocks: text length from the step hook
        seen = _record_inputs(m, ("transformer_blocks", "single_transformer_blocks"))  # startswith takes a tuple
        with torch.no_grad():
            out = m(**flux_inputs(), **kwargs).sample
        assert (out - expected).abs().max() < 1e-12
        assert sorted(site for _, site in capture.maps) == sorted(double + single)
        modules = dict(m.named_modules())
        for site in double + single:
            name = site[: -len(".processor")]
            with torch.no_grad():
                by_hand = flux_map(modules[name], seen[name][1]) if site in double else \
                    flux_single_map(modules[name], seen[name][1], lt=6)
            got = capture.maps[(0, site)]
            assert got.shape == (2, 6, 4, 4)
            torch.testing.assert_close(got, by_hand.float(), rtol=1e-5, atol=1e-6)
        remove_method(m, capture)
    # layers that had diffusers' plain processor get that very object back
    assert all(type(p) is FluxAttnProcessor for p in plain.attn_processors.values())


def test_sd3_maps_match_by_hand_image_first_layout():
    model = tiny_sd3()
    with torch.no_grad():
        ref = model(**sd3_inputs()).sample
    before = dict(model.attn_processors)
    capture = AttentionMapCapture(target=["transformer_blocks.1"], steps=[0])
    apply_method(model, capture)
    seen = _record_inputs(model, "transformer_blocks.1")
    with torch.no_grad():
        out = model(**sd3_inputs()).sample
    assert (out - ref).abs().max() < 1e-12
    attn = dict(model.named_modules())["transformer_blocks.1.attn"]
    with torch.no_grad():
        by_hand = sd3_map(attn, *seen["transformer_blocks.1.attn"])
    got = capture.maps[(0, "transformer_blocks.1.attn.processor")]
    assert got.shape == (2, 5, 8, 8) and list(capture.maps) == [(0, "transformer_blocks.1.attn.processor")]
    torch.testing.assert_close(got, by_hand.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], got[1])  # per image, not a batch average
    remove_method(model, capture)
    assert dict(model.attn_processors) == before and type(before["transformer_blocks.1.attn.processor"]) is JointAttnProcessor2_0


class _ExtraStream(EditingMethod):
    name = "extra_stream"

    def streams(self, call):
        return [(call.k, call.v, 1.0)]


def test_methods_with_streams_are_refused_untouched_and_single_blocks_need_the_text_length():
    model = tiny_flux()
    before = dict(model.attn_processors)
    with pytest.raises(ValueError, match=r"method: extra_stream adds attention streams .* only kinds 2-5"):
        apply_method(model, _ExtraStream())
    assert dict(model.attn_processors) == before
    apply_method(model, StyleAligned(target="single"))
    inputs = flux_inputs(batch=4)
    text = inputs.pop("encoder_hidden_states")
    with pytest.raises(ValueError, match=r"encoder_hidden_states: methods on Flux single-stream blocks need"):
        with torch.no_grad():
            model(inputs.pop("hidden_states"), text, **inputs)  # positional: the hook can't see the text
    remove_method(model, "style_aligned")
    assert dict(model.attn_processors) == before
    copy.deepcopy(model)  # still a plain model
