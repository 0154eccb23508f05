"""Methods that change DiT joint attention (StyleAligned's shared reference) on Flux
double-stream and SD3 joint blocks, through the one per-layer pipeline and op.

A joint block runs ONE softmax over text and image tokens together (Flux ``[text ;
image]``, SD3 ``[image ; text]``).  Editing methods were written for a UNet's
self-attention, where every token is an image token, so here they see the **image
part** of the layer only (see :class:`ImagePartView`):

- ``transform_qk`` (AdaIN) gets the image tokens' queries/keys after qk-norm and before
  RoPE (statistics of the features, not of position-rotated ones); RoPE follows for the
  whole sequence.  Text queries/keys are never changed.
- ``replace_kv`` gets the image keys (after RoPE) and values; text keys/values stay.
- ``joint_kv`` gets the image tokens only, so StyleAligned's appended keys are the
  reference's *image* keys/values (carrying RoPE of their own positions, the same grid
  as every row's); the reference's text tokens are not appended.  Joint keys join the
  one softmax of every query row of the layer, text rows included: a text token reads
  the extra image tokens as it reads the row's own.
- observers (attention maps) composed with such a method get the layout of
  :mod:`.joint_observe` (image rows; text columns, own image columns, then the joint
  columns).

The layer's main attention then is ONE ``decoupled_attention`` call: the whole joint
sequence as queries and own keys, the methods' keys as ``joint_k``/``joint_v`` (long
keys: the op's SDPA path).  A layer where no such method is attached keeps diffusers'
path (dispatch / SDPA), untouched.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..core.contributors import AttentionCall, Contributor, Kind, kinds_of
from ..core.engine import (
    LayerInputs,
    apply_replace_kv,
    apply_transform_qk,
    attend,
    collect_joint_kv,
)
from ..core.model_state import attached_at

OBSERVE = (Kind.OBSERVE,)


class ImagePartView(Contributor):
    """The changing methods of one layer call, each seeing only the image tokens.

    Ungated itself (RoPE must always run); every wrapped method's own gate is applied
    here with tensor ops, as the pipeline would: closed, its AdaIN gives back the
    original tensors and its joint keys get a ``log(0) = -inf`` bias."""

    name = "joint_image_view"

    def __init__(self, entries, image: slice, rotate: Optional[Callable], base: AttentionCall):
        self.entries, self.image, self.rotate, self.base = entries, image, rotate, base

    def _sub(self, call: AttentionCall, weight) -> AttentionCall:
        img = self.image
        return self.base.view(weight=weight, q=call.q[:, img], k=call.k[:, img], v=call.v[:, img])

    def _splice(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        if part is full[:, self.image]:
            return full
        start, stop = self.image.start or 0, self.image.stop if self.image.stop is not None else full.shape[1]
        return torch.cat([full[:, :start], part, full[:, stop:]], dim=1)

    def _each(self, kind):
        return [(e.contributor, e.weight) for e in self.entries if kind in kinds_of(type(e.contributor))]

    def transform_qk(self, call):
        sub = self._sub(call, 1.0)
        apply_transform_qk(sub, self._each(Kind.TRANSFORM_QK))
        q, k = self._splice(call.q, sub.q), self._splice(call.k, sub.k)
        if self.rotate is not None:
            q, k = self.rotate(q), self.rotate(k)
        return q, k

    def replace_kv(self, call):
        sub = self._sub(call, 1.0)
        apply_replace_kv(sub, self._each(Kind.REPLACE_KV))
        return self._splice(call.k, sub.k), self._splice(call.v, sub.v)

    def joint_kv(self, call):
        k, v, bias = collect_joint_kv(self._sub(call, 1.0), self._each(Kind.JOINT_KV))
        return None if k is None else (k, v, bias)


class ObserverView(Contributor):
    """An observer on a changed joint layer: gets :mod:`.joint_observe`'s layout (image
    rows; text columns, own image columns, then the methods' joint columns)."""

    def __init__(self, observer, weight, text: slice, image: slice, length: int):
        self.observer, self.weight, self.text, self.image, self.length = observer, weight, text, image, length
        self.gate, self.name = getattr(observer, "gate", None), observer.name

    def _sub(self, call):
        return call.view(weight=self.weight, q=call.q[:, self.image], k=call.k[:, self.text], v=call.v[:, self.text], text_bias=None)

    def observing(self, call):
        return self.observer.observing(self._sub(call))

    def observe(self, call, probs):
        rows = probs[:, :, self.image]
        rows = torch.cat([rows[..., self.text], rows[..., self.image], rows[..., self.length:]], dim=-1)
        self.observer.observe(self._sub(call), rows)


def changers(module) -> list:
    """The attached entries of a layer that change attention (anything but observers)."""
    return [e for e in attached_at(module) if kinds_of(type(e.contributor)) != OBSERVE]


def changed_joint_attention(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_len: int, image_first: bool,
                            rotate: Optional[Callable] = None, attention_mask=None) -> Optional[torch.Tensor]:
    """``(B, L, H, D)`` joint attention with the changing methods attached at ``attn``
    applied, or None when none is (the caller keeps diffusers' path).  q/k/v are
    ``(B, L, H, D)`` after qk-norm and BEFORE RoPE; ``rotate`` applies RoPE (Flux)."""
    entries = attached_at(attn)
    changing = [e for e in entries if kinds_of(type(e.contributor)) != OBSERVE]
    if not changing or text_len <= 0:
        return None
    if attention_mask is not None:
        raise ValueError(f"attention_mask: expected None on a layer with {changing[0].contributor.name} attached "
                         f"(joint keys can't be masked with it yet), got a {tuple(attention_mask.shape)} mask")
    length = query.shape[1]
    text = slice(length - text_len, length) if image_first else slice(0, text_len)
    image = slice(0, length - text_len) if image_first else slice(text_len, length)
    info = entries[0].state
    base = AttentionCall.at(entries[0].site, info, query, key, value, sample_size=None)  # no latent grid on a joint sequence
    view = ImagePartView(changing, image, rotate, base)
    observers = [(ObserverView(e.contributor, e.weight, text, image, length), 1.0)
                 for e in entries if kinds_of(type(e.contributor)) == OBSERVE]
    layer = LayerInputs(q=query, k=key, v=value, text_bias=None, full_mask=None, fallback_reason=None, ip_states=[], residual=None,
                        input_shape=tuple(query.shape))
    return attend(layer, [(view, 1.0), *observers], site=base.site, info=info)
