"""Wan self-attention (``attn1``) with editing methods attached: ONE op call per layer.

Self-attention stays on diffusers' dispatcher (long keys, RoPE, attention backends,
context parallelism) while nothing is attached there; this path runs only for a layer
that holds methods (StyleAligned's shared reference, attention maps).

diffusers' ``WanAttnProcessor`` on ``attn1``, step for step: ``norm_q(to_q(x))``,
``norm_k(to_k(x))`` (RMSNorm across heads), ``to_v(x)``, head split, RoPE on q and k
(the model's ``rotary_emb``: the (frame, row, column) position of each token), one
softmax, ``to_out``.  Here the methods see the tensors in this order:

- ``transform_qk`` (AdaIN) before RoPE: statistics of the features, not of
  position-rotated ones (as on Flux joint blocks); RoPE follows, for every token;
- ``replace_kv`` and ``joint_kv`` after RoPE: a reference's keys carry the RoPE of
  their own positions.  A reference video has the same grid as every row, so its token
  at (f, y, x) is rotated as the row's own token at (f, y, x); a first-frame reference
  keeps frame 0's positions.
"""
from __future__ import annotations

import torch

from ..core.contributors import Contributor, Kind, kinds_of
from ..core.engine import (
    LayerInputs,
    apply_replace_kv,
    apply_transform_qk,
    attend,
    collect_joint_kv,
)
from ..core.model_state import attached_at
from ..core.projections import linear
from .layer import heads, project

OBSERVE = (Kind.OBSERVE,)


def rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan RoPE (the ``apply_rotary_emb`` inside ``WanAttnProcessor.__call__``)
    on ``(B, N, H, D)``: interleaved pairs, ``cos[..., 0::2]``, ``sin[..., 1::2]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class RotatingView(Contributor):
    """The changing methods of one ``attn1`` call, with RoPE between AdaIN and the
    reference keys.  Ungated itself (RoPE must always run); each wrapped method's gate
    is applied by the engine's helpers, as the pipeline would."""

    name = "wan_self_attention"

    def __init__(self, entries, rotary_emb):
        self.entries, self.rotary_emb = entries, rotary_emb

    def _each(self, kind):
        return [(e.contributor, e.weight) for e in self.entries if kind in kinds_of(type(e.contributor))]

    def transform_qk(self, call):
        sub = call.view()
        apply_transform_qk(sub, self._each(Kind.TRANSFORM_QK))
        return rotate(sub.q, *self.rotary_emb), rotate(sub.k, *self.rotary_emb)

    def replace_kv(self, call):
        sub = call.view()
        apply_replace_kv(sub, self._each(Kind.REPLACE_KV))
        return sub.k, sub.v

    def joint_kv(self, call):
        k, v, bias = collect_joint_kv(call.view(), self._each(Kind.JOINT_KV))
        return None if k is None else (k, v, bias)


def self_attention(attn, hidden_states: torch.Tensor, rotary_emb) -> torch.Tensor | None:
    """``attn1``'s output with the methods attached there, or None where none is (the
    caller keeps diffusers' path)."""
    entries = attached_at(attn)
    if not entries:
        return None
    if rotary_emb is None:
        raise ValueError("rotary_emb: expected Wan's (cos, sin) on a self-attention layer with methods attached, got None")
    changing = [e for e in entries if kinds_of(type(e.contributor)) != OBSERVE]
    observers = [(e.contributor, e.weight) for e in entries if kinds_of(type(e.contributor)) == OBSERVE]
    fused = getattr(attn, "fused_projections", False)
    if fused:  # diffusers' fuse_projections: one to_qkv
        q, k, v = linear(attn.to_qkv, hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = linear(attn.to_q, hidden_states), linear(attn.to_k, hidden_states), linear(attn.to_v, hidden_states)
    n = attn.heads
    q, k, v = heads(attn.norm_q(q), n), heads(attn.norm_k(k), n), heads(v, n)
    layer = LayerInputs(q=q, k=k, v=v, text_bias=None, full_mask=None, fallback_reason=None, ip_states=[], residual=None,
                        input_shape=tuple(hidden_states.shape))
    # observers see the probabilities of the rotated q/k (the view rotates even with no method)
    out = attend(layer, [(RotatingView(changing, rotary_emb), 1.0), *observers], entries[0].site, entries[0].state)
    return project(attn, out, q)

