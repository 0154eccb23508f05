"""Plain PyTorch references of the published methods' math, written the way the upstream
code reads (``(B, H, L, D)`` layout, explicit matmul and softmax), for tests that run
a whole tiny UNet in float64 with them and compare against our fused methods."""
from __future__ import annotations

import copy

import torch


def _heads(attn, x):
    b, n, _ = x.shape
    return x.view(b, n, attn.heads, -1).transpose(1, 2)  # (B, H, L, D)


def expand_first(feat, halves, scale=1.0):
    """Upstream StyleAligned ``expand_first``: every row gets its CFG half's first row;
    ``scale`` multiplies it for all rows but the first of each half."""
    per = feat.shape[0] // halves
    style = torch.stack([feat[h * per] for h in range(halves)]).unsqueeze(1)  # (halves, 1, ...)
    style = style.repeat(1, per, *([1] * (feat.ndim - 1)))
    style = torch.cat([style[:, :1], scale * style[:, 1:]], dim=1)
    return style.reshape(feat.shape)


def adain(feat, halves):
    """Upstream ``adain``: statistics over tokens (dim -2), unbiased var + 1e-5."""
    mean = feat.mean(dim=-2, keepdim=True)
    std = (feat.var(dim=-2, keepdim=True) + 1e-5).sqrt()
    return (feat - mean) / std * expand_first(std, halves) + expand_first(mean, halves)


def attention(q, k, v, shift_from=None, shift=0.0):
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if shift_from is not None:
        logits[..., shift_from:] += shift
    probs = logits.softmax(-1)
    return probs @ v, probs


class RefSelfAttention:
    """Base: diffusers' self-attention plumbing of a UNet transformer block, plainly."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None and attn.group_norm is None
        q, k, v = (_heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        out = self.attend(q, k, v)
        b, h, n, d = out.shape
        out = attn.to_out[0](out.transpose(1, 2).reshape(b, n, h * d))
        return attn.to_out[1](out) / attn.rescale_output_factor

    def attend(self, q, k, v):
        return attention(q, k, v)[0]


class RefStyleAligned(RefSelfAttention):
    """google/style-aligned ``SharedAttentionProcessor.shared_call`` math."""

    def __init__(self, adain_queries=True, adain_keys=True, adain_values=False, keys_scale=1.0, score_shift=0.0, halves=2):
        self.aq, self.ak, self.av = adain_queries, adain_keys, adain_values
        self.keys_scale, self.shift, self.halves = keys_scale, score_shift, halves

    def attend(self, q, k, v):
        n = k.shape[-2]
        if self.aq:
            q = adain(q, self.halves)
        if self.ak:
            k = adain(k, self.halves)
        if self.av:
            v = adain(v, self.halves)
        k = torch.cat([k, expand_first(k, self.halves, self.keys_scale)], dim=-2)
        v = torch.cat([v, expand_first(v, self.halves)], dim=-2)
        return attention(q, k, v, shift_from=n, shift=self.shift)[0]


def concat_first(feat, halves, dim=-2):
    """Upstream ``concat_first``: ``feat`` followed by its CFG half's first row on ``dim``."""
    return torch.cat((feat, expand_first(feat, halves)), dim=dim)


def share_norms(unet, halves=2, group=True, layer=True):
    """Upstream ``register_shared_norm``: every GroupNorm / LayerNorm of ``unet`` runs on
    ``[own ; reference]`` along dim -2 and keeps its own ``n`` rows.  Returns the layers."""
    patched = []

    def visit(module):
        if (isinstance(module, torch.nn.GroupNorm) and group) or (isinstance(module, torch.nn.LayerNorm) and layer):
            patched.append(module)
        if not isinstance(module, torch.nn.GroupNorm):  # upstream does not descend into a GroupNorm
            for child in module.children():
                visit(child)

    visit(unet)
    for norm in patched:
        orig_forward = norm.forward

        def forward_(hidden_states, orig_forward=orig_forward):
            n = hidden_states.shape[-2]
            hidden_states = concat_first(hidden_states, halves, dim=-2)
            hidden_states = orig_forward(hidden_states)
            return hidden_states[..., :n, :]

        norm.forward = forward_
    return patched


class RefVisualStylePrompting(RefSelfAttention):
    """Keep the queries, swap keys and values for the reference's (first row per CFG half)."""

    def __init__(self, halves=2):
        self.halves = halves

    def attend(self, q, k, v):
        return attention(q, expand_first(k, self.halves), expand_first(v, self.halves))[0]


class RefCrossCapture:
    """Plain text cross-attention that keeps the head-averaged probabilities."""

    def __init__(self):
        self.probs = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q = _heads(attn, attn.to_q(hidden_states))
        k, v = _heads(attn, attn.to_k(encoder_hidden_states)), _heads(attn, attn.to_v(encoder_hidden_states))
        out, probs = attention(q, k, v)
        self.probs.append(probs.mean(1))  # (B, N, Lt)
        b, h, n, d = out.shape
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, h * d)))


def with_processors(unet, make, kind="attn1", only=None):
    """A float64 copy of ``unet`` with ``make()`` processors on its ``kind`` layers
    (or the layers named in ``only``); returns (copy, {name: processor})."""
    ref = copy.deepcopy(unet).double()
    procs = {}
    for name, module in ref.named_modules():
        if hasattr(module, "set_processor") and hasattr(module, "heads") and name.endswith(kind):
            key = name + ".processor"
            if only is None or key in only:
                procs[key] = make()
                module.set_processor(procs[key])
    return ref, procs


def run(unet, batch=4, seed=0, dtype=torch.float32, timestep=500, **extra):
    kwargs = unet_inputs(unet, batch=batch, seed=seed)
    kwargs["timestep"] = torch.tensor(timestep)
    cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
    kwargs = {k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v)) for k, v in kwargs.items()}
    for key, value in extra.items():
        if key == "added_cond_kwargs":
            kwargs.setdefault(key, {}).update({k: cast(v) if not isinstance(v, list) else [cast(x) for x in v] for k, v in value.items()})
        else:
            kwargs[key] = value
    with torch.no_grad():
        return unet(**kwargs).sample


class RefScaledSelf(RefSelfAttention):
    """Attention output times ``factor`` (what a stream of the layer's own K/V at
    scale ``factor - 1`` adds up to)."""

    def __init__(self, factor):
        self.factor = factor

    def attend(self, q, k, v):
        return self.factor * attention(q, k, v)[0]


class RefSharedPromptIP:
    """Cross-attention with IP-Adapter (diffusers' decoupled math, one adapter, no masks)
    whose text softmax also holds the first prompt's text keys of each CFG half."""

    def __init__(self, ip_processor, halves=2):
        self.to_k_ip, self.to_v_ip = ip_processor.to_k_ip[0], ip_processor.to_v_ip[0]
        self.scale, self.halves = ip_processor.scale[0], halves

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        text, (ip,) = encoder_hidden_states
        q = _heads(attn, attn.to_q(hidden_states))
        k, v = _heads(attn, attn.to_k(text)), _heads(attn, attn.to_v(text))
        k = torch.cat([k, expand_first(k, self.halves)], dim=-2)
        v = torch.cat([v, expand_first(v, self.halves)], dim=-2)
        ip = ip.reshape(ip.shape[0], -1, ip.shape[-1])
        out = attention(q, k, v)[0] + self.scale * attention(q, _heads(attn, self.to_k_ip(ip)), _heads(attn, self.to_v_ip(ip)))[0]
        b, h, n, d = out.shape
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, h * d)))


# -- The README's example method ("Write your own editing method"), verbatim. --------
from instantstyle.processors.methods import EditingMethod, reference_rows  # noqa: E402

from helpers.ip_fixtures import unet_inputs


class MutualSelfAttention(EditingMethod):
    """MasaCtrl (Cao et al. 2023): from a chosen step on, every image's self-attention
    queries read the keys and values of the batch's first image (its "source"), so
    edited images keep the source's appearance while following their own prompt.
    The first row of each CFG half is a source; upstream starts at step 4 of 50 and
    in the decoder's self-attention layers."""

    name = "masactrl"
    kind = "self"  # self-attention layers only
    default_target = ["up_blocks.*"]  # the decoder: module-path patterns, or a preset

    def __init__(self, target=None, *, start_at=0.08, end_at=1.0, cfg=True, name=None):
        super().__init__(target, start_at=start_at, end_at=end_at, name=name)
        self.halves = 2 if cfg else 1

    def replace_kv(self, call):  # kind 3: K/V replacement
        rows = reference_rows(call.batch, self.halves, device=call.k.device)
        return call.k[rows], call.v[rows]  # queries stay the image's own


def one_layer(unet, method, ref_processor, dtype, batch=4, tokens=16, seed=0):
    """``(ours, expected)``: one of ``method``'s layers run in ``dtype`` with the method
    applied, and the same layer in float64 with ``ref_processor``."""
    from instantstyle.processors.methods import apply_method

    injection = apply_method(unet, method)
    name = next(iter(injection.weights))
    attn = dict(unet.named_modules())[name[: -len(".processor")]]
    ref = copy.deepcopy(attn).double()
    ref.set_processor(ref_processor)
    attn.to(dtype)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, attn.to_q.in_features, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return attn(hidden.to(dtype)), ref(hidden)


class FloatStream(EditingMethod):
    """A user method whose ``streams()`` returns a plain float scale (which the dispatch
    once turned into a CPU tensor: a device error or a copy per call on a GPU)."""

    name = "float_stream"
    kind = "cross"
    default_target = "style"

    def streams(self, call):
        return [(call.k, call.v, 0.5)]
