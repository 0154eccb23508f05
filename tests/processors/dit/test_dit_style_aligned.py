"""StyleAligned's shared reference on Flux double-stream and SD3 joint attention, against a
float64 by-hand reference built from the layers' own weights and recorded inputs; removal,
step gates, CFG halves."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from instantstyle.processors.dit.flux import FusedFluxIPAdapterAttnProcessor
from instantstyle.processors.methods import AttentionMapCapture, StyleAligned, apply_method, remove_method

from helpers.dit_fixtures import embeds, flux_inputs, sd3_inputs, tiny_flux, tiny_sd3, xlabs_state


def _heads(x, heads):
    return x.unflatten(-1, (heads, -1))


def _adain(x, rows):
    mean, std = x.mean(1, keepdim=True), (x.var(1, keepdim=True) + 1e-5).sqrt()
    return (x - mean) / std * std[rows] + mean[rows]


def _record(model, prefix):
    """Each joint attention module's call (args, kwargs) and output, from a forward hook."""
    seen = {}
    for name, module in model.named_modules():
        if name.startswith(prefix) and name.endswith(".attn"):
            module.register_forward_hook(lambda m, a, kw, out, name=name: seen.__setitem__(name, (a, kw, out)), with_kwargs=True)
    return seen


def _shared(q, k, v, image, rows, keys_scale=1.0, score_shift=0.0):
    """One softmax over [own ; reference image K/V] (the reference's own keys appended too)."""
    kj, vj = k[rows][:, image], v[rows][:, image]
    is_ref = rows == torch.arange(len(rows))
    kj = kj * (is_ref.double() + (~is_ref).double() * keys_scale)[:, None, None, None]
    logits = torch.einsum("bqhd,bkhd->bhqk", q, torch.cat([k, kj], 1)) / q.shape[-1] ** 0.5
    logits[..., k.shape[1]:] += score_shift
    probs = logits.softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, torch.cat([v, vj], 1)), probs


def flux_by_hand(attn, kw, rows, **opts):
    hs, ehs, rope = kw["hidden_states"], kw["encoder_hidden_states"], kw["image_rotary_emb"]
    h = attn.heads
    q, k, v = attn.norm_q(_heads(attn.to_q(hs), h)), attn.norm_k(_heads(attn.to_k(hs), h)), _heads(attn.to_v(hs), h)
    eq, ek = attn.norm_added_q(_heads(attn.add_q_proj(ehs), h)), attn.norm_added_k(_heads(attn.add_k_proj(ehs), h))
    ev = _heads(attn.add_v_proj(ehs), h)
    q, k = torch.cat([eq, _adain(q, rows)], 1), torch.cat([ek, _adain(k, rows)], 1)  # AdaIN before RoPE, image only
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    lt = ehs.shape[1]
    out, probs = _shared(q, k, torch.cat([ev, v], 1), slice(lt, None), rows, **opts)
    out = out.flatten(2)
    return (attn.to_out[0](out[:, lt:]), attn.to_add_out(out[:, :lt])), probs[:, :, lt:, :lt].mean(1)


def flux_single_by_hand(attn, kw, rows, lt, **opts):
    """A single-stream block: one [text ; image] sequence, AdaIN and the shared reference on
    its image part; the block's processor returns the attention output (no to_out)."""
    hs, rope = kw["hidden_states"], kw["image_rotary_emb"]
    h = attn.heads
    q, k, v = attn.norm_q(_heads(attn.to_q(hs), h)), attn.norm_k(_heads(attn.to_k(hs), h)), _heads(attn.to_v(hs), h)
    q = torch.cat([q[:, :lt], _adain(q[:, lt:], rows)], 1)
    k = torch.cat([k[:, :lt], _adain(k[:, lt:], rows)], 1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    out, _ = _shared(q, k, v, slice(lt, None), rows, **opts)
    return out.flatten(2)


def sd3_by_hand(attn, args, kw, rows):
    hs, ehs = kw.get("hidden_states", args[0] if args else None), kw["encoder_hidden_states"]
    h = attn.heads
    q, k, v = attn.norm_q(_heads(attn.to_q(hs), h)), attn.norm_k(_heads(attn.to_k(hs), h)), _heads(attn.to_v(hs), h)
    eq, ek = attn.norm_added_q(_heads(attn.add_q_proj(ehs), h)), attn.norm_added_k(_heads(attn.add_k_proj(ehs), h))
    ev = _heads(attn.add_v_proj(ehs), h)
    n = hs.shape[1]
    q, k = torch.cat([_adain(q, rows), eq], 1), torch.cat([_adain(k, rows), ek], 1)  # SD3: image first, no RoPE
    out, _ = _shared(q, k, torch.cat([v, ev], 1), slice(0, n), rows)
    out = out.flatten(2)
    enc = out[:, n:] if attn.context_pre_only else attn.to_add_out(out[:, n:])
    return attn.to_out[0](out[:, :n]), enc


def _close(got, want):
    assert (got - want).abs().max() < 1e-10, (got - want).abs().max()


@pytest.mark.parametrize("opts", [{}, {"keys_scale": 1.7, "score_shift": -0.4}])
def test_flux_double_stream_matches_by_hand_with_maps_and_removal_restores(opts):
    model = tiny_flux()
    inputs = flux_inputs(batch=4)
    with torch.no_grad():
        plain = model(**inputs).sample
    before = dict(model.attn_processors)
    method = StyleAligned(**opts)  # cfg=True: rows 0 and 2 are the references
    injection = apply_method(model, method)
    double = [f"transformer_blocks.{i}.attn.processor" for i in range(2)]
    single = [n for n in model.attn_processors if n.startswith("single_transformer_blocks.")]
    assert sorted(injection.weights) == sorted(double + single)  # single: text length from the step hook
    maps = AttentionMapCapture()
    apply_method(model, maps)
    seen = _record(model, ("transformer_blocks", "single_transformer_blocks"))  # startswith takes a tuple
    with torch.no_grad():
        out = model(**inputs).sample
    assert (out - plain).abs().max() > 1e-3
    rows = torch.tensor([0, 0, 2, 2])
    modules = dict(model.named_modules())
    for site in double:
        name = site[: -len(".processor")]
        _, kw, got = seen[name]
        with torch.no_grad():
            (img, txt), text_map = flux_by_hand(modules[name], kw, rows, **opts)
        _close(got[0], img)
        _close(got[1], txt)
        torch.testing.assert_close(maps.maps[(0, site)], text_map.transpose(1, 2).reshape(4, 6, 4, 4).float())
    for site in single:
        name = site[: -len(".processor")]
        _, kw, got = seen[name]
        with torch.no_grad():
            _close(got, flux_single_by_hand(modules[name], kw, rows, lt=inputs["encoder_hidden_states"].shape[1], **opts))
    remove_method(model, maps)
    remove_method(model, method)
    assert all(model.attn_processors[k] is p for k, p in before.items())
    assert all(type(p) is FluxAttnProcessor for p in before.values())
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, plain)


def test_sd3_joint_matches_by_hand_every_block_including_context_pre_only():
    model = tiny_sd3()
    inputs = sd3_inputs(batch=4)
    with torch.no_grad():
        plain = model(**inputs).sample
    before = dict(model.attn_processors)
    apply_method(model, StyleAligned())
    seen = _record(model, "transformer_blocks")
    with torch.no_grad():
        out = model(**inputs).sample
    assert (out - plain).abs().max() > 1e-3
    modules = dict(model.named_modules())
    assert modules["transformer_blocks.2.attn"].context_pre_only  # the last block's text is not projected
    for i in range(3):
        name = f"transformer_blocks.{i}.attn"
        args, kw, got = seen[name]
        with torch.no_grad():
            img, txt = sd3_by_hand(modules[name], args, kw, torch.tensor([0, 0, 2, 2]))
        _close(got[0], img)
        _close(got[1], txt)
    remove_method(model, "style_aligned")
    assert all(model.attn_processors[k] is p and type(p) is JointAttnProcessor2_0 for k, p in before.items())
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, plain)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_step_gate_and_cfg_halves(family):
    """start_at=0.6 opens at sigma <= 0.4 (Flux timestep = sigma, SD3 = 1000 sigma); each
    CFG half references its own first row only."""
    model, make = (tiny_flux(), flux_inputs) if family == "flux" else (tiny_sd3(), sd3_inputs)
    unit = 1.0 if family == "flux" else 1000.0
    closed, opened = make(batch=4), make(batch=4)
    closed["timestep"] = closed["timestep"] * 0 + 0.5 * unit
    opened["timestep"] = opened["timestep"] * 0 + 0.3 * unit
    with torch.no_grad():
        plain_closed, plain_open = model(**closed).sample, model(**opened).sample
    apply_method(model, StyleAligned(start_at=0.6))
    with torch.no_grad():
        gated = model(**closed).sample
        active = model(**opened).sample
    assert (gated - plain_closed).abs().max() < 1e-10  # closed: the reference keys are masked out exactly
    assert (active - plain_open).abs().max() > 1e-3
    assert (active[[0, 2]] - plain_open[[0, 2]]).abs().max() > 1e-3  # references also change (own keys twice)
    other = {k: (v.clone() if isinstance(v, torch.Tensor) and v.shape[0] == 4 else v) for k, v in opened.items()}
    other["hidden_states"][:2] += 1.0  # the unconditional half changes ...
    with torch.no_grad():
        moved = model(**other).sample
    assert torch.allclose(moved[2:], active[2:], atol=1e-12, rtol=0)  # ... the conditional half doesn't see it
    assert (moved[:2] - active[:2]).abs().max() > 1e-3


def test_with_xlabs_ip_adapter_the_ip_branch_is_kept():
    model = tiny_flux()
    model._load_ip_adapter_weights([xlabs_state(model)], low_cpu_mem_usage=False)
    model.to(torch.float64)
    kwargs = {"joint_attention_kwargs": {"ip_adapter_image_embeds": [embeds(4, 1, 32)]}}
    inputs = flux_inputs(batch=4)
    with torch.no_grad():
        ip_only = model(**inputs, **kwargs).sample
    procs = dict(model.attn_processors)
    apply_method(model, StyleAligned())
    with torch.no_grad():
        both = model(**inputs, **kwargs).sample
    assert (both - ip_only).abs().max() > 1e-3
    remove_method(model, "style_aligned")
    # IP layers keep the fused copy of diffusers' processor (same weights), as on UNets
    for key, proc in model.attn_processors.items():
        if key.startswith("transformer_blocks"):
            assert type(proc) is FusedFluxIPAdapterAttnProcessor and torch.equal(proc.to_k_ip[0].weight, procs[key].to_k_ip[0].weight)
    with torch.no_grad():
        assert (model(**inputs, **kwargs).sample - ip_only).abs().max() < 1e-12
