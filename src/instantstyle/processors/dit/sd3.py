"""SD3 / SD3.5 (``SD3Transformer2DModel``): a drop-in ``SD3IPAdapterJointAttnProcessor2_0``
on the one per-layer pipeline.

diffusers' math (InstantX SD3.5-Large IP-Adapter): the main attention is the usual joint
attention over [image ; text] (SDPA, long keys: it stays on diffusers' path).  The IP
branch is a second attention of the *raw* image queries over ``[image keys ; IP keys]``
in ONE softmax, with the processor's own RMSNorms on the image query, the image keys
and the IP keys (separate weights from the attention's), and ``[image values ; IP
values]``; ``hidden_states + scale * ip_out`` then goes through ``to_out``.

In the op's terms that branch is exactly "own keys plus joint keys in the first
softmax": ``parse_ip`` makes the normed image q/k and raw v the layer's q/k/v, and the
processor, as a contributor, adds the IP keys with ``joint_kv``.  One op call, no
concatenated K/V copy (the kernel reads the joint keys in place).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    JointAttnProcessor2_0,
    SD3IPAdapterJointAttnProcessor2_0,
)

from ..core.contributors import AttentionCall, Contributor
from ..core.drop_in import DropInProcessor
from ..core.engine import LayerInputs, attend
from ..core.ip_pairing import paired_ip_states
from .joint_methods import changed_joint_attention
from .joint_observe import observed_joint_attention


def joint_attention(attn, hidden_states, encoder_hidden_states):
    """diffusers' SD3 joint attention, step for step.  Returns ``(out, encoder_out,
    (q, k, v))``: the image part of the output before ``to_out``, the text part after
    ``to_add_out`` (or None), and the raw image q/k/v in ``(B, N, H, D)``."""
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    raw = tuple(t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
    query, key, value = (t.transpose(1, 2) for t in raw)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    n = hidden_states.shape[1]
    if encoder_hidden_states is not None:
        eq = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        ek = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        ev = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query, key, value = torch.cat([query, eq], dim=2), torch.cat([key, ek], dim=2), torch.cat([value, ev], dim=2)
    # methods that change joint attention (joint_methods: StyleAligned) see the image
    # part; attention-map capture (joint_observe) needs the probabilities; otherwise SDPA
    text_len = query.shape[2] - n
    seq = (query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    out = changed_joint_attention(attn, *seq, text_len, True)
    if out is None:
        out = observed_joint_attention(attn, *seq, text_len, True)
    if out is None:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False).transpose(1, 2)
    out = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    encoder_out = None
    if encoder_hidden_states is not None:
        out, encoder_out = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            encoder_out = attn.to_add_out(encoder_out)
    return out, encoder_out, raw


def parse_ip(proc, raw, ip_hidden_states, temb) -> LayerInputs:
    """The IP branch as :class:`LayerInputs`: the processor's own norms on the raw image
    query and keys; the IP tokens (AdaLayerNorm(temb)) ride along for ``joint_kv``."""
    q, k, v = raw
    return LayerInputs(
        q=proc.norm_q(q), k=proc.norm_k(k), v=v, text_bias=None, full_mask=None, fallback_reason=None,
        ip_states=[(paired_ip_states([ip_hidden_states], q.shape[0])[0], temb)], residual=None, input_shape=tuple(q.shape),
    )


class FusedSD3IPAdapterJointAttnProcessor(DropInProcessor, Contributor, SD3IPAdapterJointAttnProcessor2_0):
    """``SD3IPAdapterJointAttnProcessor2_0`` whose IP branch is one op call with the IP
    keys as joint keys.  Same constructor, weights, ``scale`` (one float, as diffusers'
    ``set_ip_adapter_scale`` sets it) and ``__call__``; ``isinstance`` checks in
    diffusers' ``set_ip_adapter_scale``/``unload_ip_adapter``/``is_ip_adapter_active``
    see it as diffusers' own."""

    counts_as_cross_attention = True
    name = "ip_adapter"
    adapter_ids = (0,)  # diffusers' SD3 loader takes one adapter

    def __init__(self, hidden_size, ip_hidden_states_dim, head_dim, timesteps_emb_dim=1280, scale=0.5):
        Contributor.__init__(self)
        SD3IPAdapterJointAttnProcessor2_0.__init__(self, hidden_size, ip_hidden_states_dim, head_dim, timesteps_emb_dim, scale)
        self.fallback_reason = None

    def joint_kv(self, call: AttentionCall):
        ip_hidden_states, temb = call.ip_states[0]
        batch, _, heads, head_dim = call.q.shape
        normed = self.norm_ip(ip_hidden_states, temb=temb)
        ip_k = self.norm_ip_k(self.to_k_ip(normed).view(batch, -1, heads, head_dim))
        ip_v = self.to_v_ip(normed).view(batch, -1, heads, head_dim)
        return ip_k, ip_v, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, ip_hidden_states=None, temb=None):
        out, encoder_out, raw = joint_attention(attn, hidden_states, encoder_hidden_states)
        # diffusers skips the branch at scale 0 (eager; the value is a Python float here)
        if self.scale != 0 and ip_hidden_states is not None:
            layer = parse_ip(self, raw, ip_hidden_states, temb)
            ip = attend(layer, ((self, 1.0),))
            ip = ip.reshape(ip.shape[0], ip.shape[1], -1).to(out.dtype)
            out = out + ip * self.scale
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_out is None else (out, encoder_out)


class FusedSD3JointAttnProcessor(DropInProcessor, JointAttnProcessor2_0):
    """``JointAttnProcessor2_0`` where editing methods attach (attention-map capture): the
    same math and outputs; SDPA whenever nothing observes the call."""

    def __init__(self):
        super().__init__()
        self.fallback_reason = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out, encoder_out, _ = joint_attention(attn, hidden_states, encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_out is None else (out, encoder_out)
