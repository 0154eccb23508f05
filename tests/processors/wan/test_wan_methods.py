"""Editing methods on Wan video transformers, through the registry: per-frame
cross-attention maps and StyleAligned on self-attention (reference video or first
frame), each checked against float64 formulas written out here; one engine call per
layer; self-attention left on diffusers' dispatcher where nothing is attached; and
remove_method giving back diffusers' outputs bit for bit."""
import math

import pytest
import torch
from diffusers.models.transformers import transformer_wan

import instantstyle.processors.wan.processor as wan_processor
import instantstyle.processors.wan.self_attention as wan_self
from instantstyle.processors.methods import apply_method, remove_method
from instantstyle.processors.methods.video_maps import (
    VideoAttentionMaps,
    frame_maps,
    save_frame_heatmaps,
)
from instantstyle.processors.methods.video_style_aligned import VideoStyleAligned
from instantstyle.processors.wan.conversion import use_fused_wan

EPS = 1e-5


def _grab(module, into: dict):
    """Record the positional inputs and the output of ``module``'s next calls."""
    def pre(m, args):
        into["args"] = args

    def post(m, args, out):
        into["out"] = out

    return module.register_forward_pre_hook(pre), module.register_forward_hook(post)


def _softmax_attention(q, k, v):
    """(B, N, H, D) x (B, L, H, D) -> output (B, N, H, D), probs (B, H, N, L)."""
    s = torch.einsum("bnhd,blhd->bhnl", q, k) / math.sqrt(q.shape[-1])
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhnl,blhd->bnhd", p, v), p


def _rope(x, cos, sin):
    """RoPE by hand: each pair (x[2i], x[2i+1]) rotated by the angle of channel 2i."""
    out = x.clone()
    for i in range(0, x.shape[-1], 2):
        c, s = cos[..., i], sin[..., i]
        out[..., i] = x[..., i] * c - x[..., i + 1] * s
        out[..., i + 1] = x[..., i] * s + x[..., i + 1] * c
    return out


def _adain(x, ref_mean, ref_std, dim):
    mean, std = x.mean(dim, keepdim=True), (x.var(dim, keepdim=True) + EPS).sqrt()
    return (x - mean) / std * ref_std + ref_mean


@pytest.mark.parametrize("family", ["wan", "skyreels"])
def test_frame_maps_match_a_by_hand_softmax(family, request, wan_inputs):
    model = request.getfixturevalue(family)
    inputs = dict(wan_inputs, hidden_states=torch.randn(2, 4, 3, 6, 4, dtype=torch.float64))  # grid (3, 3, 2): awkward
    use_fused_wan(model)
    capture = VideoAttentionMaps(target=["blocks.1"], tokens=[0, 5, 511])
    apply_method(model, capture)
    seen = {}
    handles = _grab(model.blocks[1].attn2, seen)
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    x, context = seen["args"][0], seen["args"][1]
    attn = model.blocks[1].attn2
    heads = attn.heads
    q = attn.norm_q(x @ attn.to_q.weight.T + attn.to_q.bias).unflatten(-1, (heads, -1))
    text = context[:, -512:]
    k = attn.norm_k(text @ attn.to_k.weight.T + attn.to_k.bias).unflatten(-1, (heads, -1))
    v = (text @ attn.to_v.weight.T + attn.to_v.bias).unflatten(-1, (heads, -1))
    _, p = _softmax_attention(q, k, v)
    mean = p.mean(1)  # (B, N, L)
    f, h, w = 3, 3, 2
    expected = torch.empty(2, 3, f, h, w, dtype=torch.float64)
    for j, token in enumerate([0, 5, 511]):
        for n in range(f * h * w):
            expected[:, j, n // (h * w), (n // w) % h, n % w] = mean[:, n, token]
    got = capture.maps[(0, "blocks.1.attn2.processor")]
    assert got.shape == (2, 3, f, h, w)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)  # maps are stored as float32
    torch.testing.assert_close(capture.video_maps(index=0), got[0])
    assert torch.equal(frame_maps(p, (f, h, w))[:, :, [0, 5, 511]].mean(1), expected)


def test_frame_maps_and_heatmaps_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="grid: expected F \\* h \\* w = 12"):
        frame_maps(torch.rand(1, 2, 12, 5), (2, 2, 2))
    with pytest.raises(ValueError, match="path: expected a name ending .gif or .png"):
        save_frame_heatmaps(torch.rand(3, 4, 5), str(tmp_path / "x.jpg"))
    from PIL import Image

    gif = save_frame_heatmaps(torch.rand(3, 4, 5), str(tmp_path / "a.gif"), size=16)
    png = save_frame_heatmaps(torch.rand(3, 4, 5), str(tmp_path / "a.png"), size=16)
    assert Image.open(gif).n_frames == 3 and Image.open(png).size == (3 * 20, 16)


def _by_hand_self_attention(attn, x, cos, sin, reference, frames):
    """Wan attn1 with StyleAligned, from the formulas: AdaIN of q/k toward the reference
    (pre-RoPE), RoPE, one softmax over [own keys ; reference keys], to_out."""
    heads = attn.heads
    q = attn.norm_q(x @ attn.to_q.weight.T + attn.to_q.bias).unflatten(-1, (heads, -1))
    k = attn.norm_k(x @ attn.to_k.weight.T + attn.to_k.bias).unflatten(-1, (heads, -1))
    v = (x @ attn.to_v.weight.T + attn.to_v.bias).unflatten(-1, (heads, -1))
    if reference == "first_video":
        def ada(t):
            ref = t[:1]
            return _adain(t, ref.mean(1, keepdim=True), (ref.var(1, keepdim=True) + EPS).sqrt(), 1)
    else:
        def ada(t):
            tf = t.unflatten(1, (frames, -1))
            ref = tf[:, :1]
            return _adain(tf, ref.mean(2, keepdim=True), (ref.var(2, keepdim=True) + EPS).sqrt(), 2).flatten(1, 2)
    q, k = _rope(ada(q), cos, sin), _rope(ada(k), cos, sin)
    if reference == "first_video":
        k_ref, v_ref = k[:1].expand_as(k), v[:1].expand_as(v)
    else:
        first = k.shape[1] // frames
        k_ref, v_ref = k[:, :first], v[:, :first]
    out, _ = _softmax_attention(q, torch.cat([k, k_ref], 1), torch.cat([v, v_ref], 1))
    return out.flatten(2) @ attn.to_out[0].weight.T + attn.to_out[0].bias


@pytest.mark.parametrize("reference", ["first_video", "first_frame"])
def test_style_aligned_on_video_self_attention_matches_by_hand(reference, wan, wan_inputs):
    inputs = dict(wan_inputs, hidden_states=torch.randn(3, 4, 3, 4, 6, dtype=torch.float64))  # B 3, grid (3, 2, 3)
    inputs.update(timestep=torch.tensor([700.0] * 3, dtype=torch.float64),
                  encoder_hidden_states=torch.randn(3, 512, 32, dtype=torch.float64),
                  encoder_hidden_states_image=torch.randn(3, 5, 4, dtype=torch.float64))
    apply_method(wan, VideoStyleAligned(target=["blocks.2"], reference=reference))
    seen = {}
    handles = _grab(wan.blocks[2].attn1, seen)
    with torch.no_grad():
        wan(**inputs)
        x, _, _, (cos, sin) = seen["args"]
        expected = _by_hand_self_attention(wan.blocks[2].attn1, x, cos, sin, reference, frames=3)
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen["out"], expected, atol=1e-10, rtol=1e-10)
    plain = transformer_wan.WanAttnProcessor()(wan.blocks[2].attn1, x, None, None, (cos, sin))
    assert not torch.allclose(seen["out"], plain)  # the method changes something


def test_first_frame_refuses_keys_scale():
    with pytest.raises(ValueError, match="keys_scale: expected 1 with reference='first_frame'"):
        VideoStyleAligned(reference="first_frame", keys_scale=2.0)
    with pytest.raises(ValueError, match="reference: expected one of first_video, first_frame"):
        VideoStyleAligned(reference="middle")


def test_one_engine_call_per_layer_and_self_attention_stays_on_diffusers(wan, wan_inputs, monkeypatch):
    sites, dispatched = [], []
    for module in (wan_processor, wan_self):
        real = module.attend
        monkeypatch.setattr(module, "attend", lambda layer, entries, site="", info=None, real=real:
                            sites.append(site) or real(layer, entries, site, info))
    real_dispatch = transformer_wan.dispatch_attention_fn
    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn",
                        lambda *a, **k: dispatched.append(a[0].shape) or real_dispatch(*a, **k))
    use_fused_wan(wan)
    apply_method(wan, VideoStyleAligned(target=["blocks.0", "blocks.2"]))
    apply_method(wan, VideoAttentionMaps(target=["blocks.1"]))
    with torch.no_grad():
        wan(**wan_inputs)
    # attn1 of blocks 0 and 2 (StyleAligned), every attn2 (fused image branch; maps at 1): one call each
    assert sorted(s for s in sites if s) == sorted(["blocks.0.attn1.processor", "blocks.2.attn1.processor",
                                                    "blocks.1.attn2.processor"])
    assert len(sites) == 5  # + blocks.0/2.attn2, bare (nothing attached)
    assert len(dispatched) == 1  # blocks.1.attn1 alone: diffusers' dispatcher
    assert type(wan.blocks[1].attn1.processor) is transformer_wan.WanAttnProcessor


def test_remove_method_restores_diffusers_outputs_exactly(wan, wan_inputs):
    with torch.no_grad():
        before = wan(**wan_inputs).sample
    procs = dict(wan.attn_processors)
    style, maps = VideoStyleAligned(reference="first_frame"), VideoAttentionMaps()
    apply_method(wan, style)
    apply_method(wan, maps)
    with torch.no_grad():
        during = wan(**wan_inputs).sample
    assert not torch.allclose(during, before) and len(maps.maps) == 3
    remove_method(wan, style)
    remove_method(wan, maps)
    with torch.no_grad():
        after = wan(**wan_inputs).sample
    assert torch.equal(after, before)
    assert all(wan.attn_processors[s] is p for s, p in procs.items())
    assert not any(isinstance(h, object) and type(h).__name__ == "GridHook" for h in wan._forward_pre_hooks.values())
