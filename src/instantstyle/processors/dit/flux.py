"""Flux (``FluxTransformer2DModel``): drop-in IP-Adapter processors on the one per-layer
pipeline.

Flux attention is long-key joint attention over [text ; image] with RoPE; it stays on
diffusers' path (``dispatch_attention_fn``, so attention backends and context
parallelism keep working).  What the pipeline fuses is the IP branch: every IP-Adapter
stream of a layer in ONE op call (``pipeline.attend``), instead of one attention call,
a reshape, a scale and an add per adapter.

The IP branch has no text part, so ``parse`` hands the op one zero key with a zero
value as its "text" keys: that softmax is 1 over a zero vector, i.e. exactly 0, and the
op's output is ``sum_i scale_i * softmax(q k_i^T) v_i`` (no masked-row convention
needed).  An op call without text keys would save that one-key pass (see the report
of issue 11).

Two checkpoint formats, two processors:

- XLabs (diffusers' ``FluxIPAdapterAttnProcessor``, double-stream blocks only): IP
  query = the image tokens' query after ``norm_q``, before RoPE; ``to_k_ip``/``to_v_ip``
  with bias; the sum is returned as a third output, which the block adds to the image
  residual after the feed-forward.  ``ip_adapter_masks`` is accepted and ignored, as
  diffusers does.
- InstantX FLUX.1-dev (Shakker-Labs' ComfyUI-IPAdapter-Flux, double AND single blocks):
  same query (single blocks: the whole joint sequence's), bias-free ``to_k_ip``/
  ``to_v_ip`` followed by a parameter-free RMSNorm (eps 1e-5) on the IP keys AND
  values; ``scale * attn`` is added to the attention output before ``to_out``
  (double) or returned with it (single, where ``proj_out`` follows in the block).
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxIPAdapterAttnProcessor,
    _get_qkv_projections,
)

from ..core.contributors import AttentionCall
from ..core.drop_in import DropInProcessor
from ..core.engine import LayerInputs, attend
from ..core.ip_adapter import IPAdapterStreams
from ..core.ip_pairing import paired_ip_states
from ..core.model_state import attached_at
from .joint_methods import changed_joint_attention
from .joint_observe import observed_joint_attention


# -- parse -------------------------------------------------------------------------------
def _single_stream_text_len(attn) -> int:
    """Where the text ends in a single-stream block's ``[text ; image]`` sequence: only
    methods attached there need it, and the model's step hook recorded it from the
    transformer's ``encoder_hidden_states`` (0 when nothing is attached)."""
    entries = attached_at(attn)
    if not entries:
        return 0
    text_len = getattr(entries[0].state, "text_len", None)
    if not text_len:
        raise ValueError("encoder_hidden_states: methods on Flux single-stream blocks need the transformer called with "
                         "encoder_hidden_states=... as a keyword (to know where the text ends), got none")
    return text_len


def joint_attention(proc, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
    """diffusers' Flux joint attention, step for step (``FluxIPAdapterAttnProcessor``).

    Returns ``(out, text_len, ip_query)``: ``out`` the attention output ``(B, L, H*D)``
    over [text ; image] (or the image/single sequence), before ``to_out``; ``ip_query``
    the normed, pre-RoPE queries of the sequence the processor was given (image tokens
    in double blocks, the joint sequence in single blocks) in ``(B, L, H, D)``."""
    query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = query.unflatten(-1, (attn.heads, -1))
    key = key.unflatten(-1, (attn.heads, -1))
    value = value.unflatten(-1, (attn.heads, -1))
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    ip_query = query
    text_len = 0
    if encoder_hidden_states is not None:
        encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (attn.heads, -1)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (attn.heads, -1)))
        encoder_value = encoder_value.unflatten(-1, (attn.heads, -1))
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
        text_len = encoder_hidden_states.shape[1]
    else:
        text_len = _single_stream_text_len(attn)
    # methods that change joint attention (joint_methods: StyleAligned) work on the
    # image part before RoPE; attention-map capture (joint_observe) needs the
    # probabilities; otherwise diffusers' path
    rotate = None if image_rotary_emb is None else (lambda t: apply_rotary_emb(t, image_rotary_emb, sequence_dim=1))
    out = changed_joint_attention(attn, query, key, value, text_len, False, rotate, attention_mask)
    if out is not None:
        return out.flatten(2, 3).to(query.dtype), text_len, ip_query
    if rotate is not None:
        query, key = rotate(query), rotate(key)
    out = observed_joint_attention(attn, query, key, value, text_len, False, attention_mask)
    if out is None:
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=proc._attention_backend, parallel_config=proc._parallel_config,
        )
    out = out.flatten(2, 3).to(query.dtype)
    return out, text_len, ip_query


def parse_ip(ip_query: torch.Tensor, ip_hidden_states) -> LayerInputs:
    """The IP branch as :class:`LayerInputs`: the IP queries, and one zero key/value
    as the text part (a softmax over one key is 1; times a zero value it adds 0)."""
    batch, _, heads, head_dim = ip_query.shape
    zero = ip_query.new_zeros((batch, 1, heads, head_dim))
    return LayerInputs(
        q=ip_query, k=zero, v=zero, text_bias=None, full_mask=None, fallback_reason=None,
        ip_states=paired_ip_states(list(ip_hidden_states or []), batch), residual=None, input_shape=tuple(ip_query.shape),
        ip_adapter_masks=None,  # diffusers' Flux processors take masks and ignore them
    )


def project_ip(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, N, H, D)`` op output -> ``(B, N, H*D)`` in the queries' dtype."""
    out = out.reshape(out.shape[0], out.shape[1], -1)
    return out if out.dtype == like.dtype else out.to(like.dtype)


def ip_branch(proc, ip_query: torch.Tensor, ip_hidden_states) -> Optional[torch.Tensor]:
    """``sum_i scale_i * attn(q, k_i, v_i)`` as ``(B, N, H*D)``, or None when the layer
    holds no adapter or gets no IP states (nothing to add)."""
    if not proc.adapter_ids or not ip_hidden_states:
        return None
    layer = parse_ip(ip_query, ip_hidden_states)
    return project_ip(attend(layer, ((proc, 1.0),)), ip_query)


def _ids_and_tokens(num_tokens, adapter_ids):
    num_tokens = list(num_tokens) if isinstance(num_tokens, (tuple, list)) else [num_tokens]
    return num_tokens, IPAdapterStreams.check_adapter_ids(adapter_ids, len(num_tokens))


# -- XLabs -------------------------------------------------------------------------------
class FusedFluxIPAdapterAttnProcessor(DropInProcessor, IPAdapterStreams, FluxIPAdapterAttnProcessor):
    """``FluxIPAdapterAttnProcessor`` with all IP streams of a layer in one op call.

    Same constructor, attributes (``to_k_ip``/``to_v_ip`` Linear with bias, ``scale``:
    one entry per adapter) and ``__call__``, so diffusers' ``set_ip_adapter_scale`` and
    ``unload_ip_adapter`` keep working.  ``adapter_ids``: the adapters this layer holds
    weights for (a layer outside every target holds none and does no IP work)."""

    counts_as_cross_attention = True

    def __init__(self, hidden_size, cross_attention_dim, num_tokens=(4,), scale=1.0, device=None, dtype=None, adapter_ids=None):
        num_tokens, ids = _ids_and_tokens(num_tokens, adapter_ids)
        FluxIPAdapterAttnProcessor.__init__(self, hidden_size, cross_attention_dim, [num_tokens[a] for a in ids], 1.0, device, dtype)
        self.init_streams(ids, num_tokens, scale)
        self.fallback_reason = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ip_hidden_states=None, ip_adapter_masks=None):
        out, text_len, ip_query = joint_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out = attn.to_add_out(encoder_out)
        ip = ip_branch(self, ip_query, ip_hidden_states)
        return out, encoder_out, (torch.zeros_like(out) if ip is None else ip)


# -- InstantX ----------------------------------------------------------------------------
class InstantXStreams(IPAdapterStreams):
    """InstantX's streams: bias-free K/V projections, then RMSNorm (no weight) on both."""

    def streams(self, call: AttentionCall):
        if not self.adapter_ids or not call.ip_states:
            return []
        batch, _, heads, head_dim = call.q.shape
        out = []
        for adapter, to_k, to_v in zip(self.adapter_ids, self.to_k_ip, self.to_v_ip):
            if adapter >= len(call.ip_states) or self._is_off(adapter):
                continue
            states = call.ip_states[adapter]
            k = self.norm_added_k(to_k(states).view(batch, -1, heads, head_dim))
            v = self.norm_added_v(to_v(states).view(batch, -1, heads, head_dim))
            out.append((k, v, self._adapter_scale(adapter), None))
        return out


class FusedFluxInstantXAttnProcessor(DropInProcessor, InstantXStreams, FluxIPAdapterAttnProcessor):
    """InstantX FLUX.1-dev IP-Adapter for double- and single-stream blocks (diffusers has
    no processor for it).  A ``FluxIPAdapterAttnProcessor`` subclass, so diffusers'
    ``unload_ip_adapter`` restores ``FluxAttnProcessor`` everywhere and
    ``set_ip_adapter_scale`` sets the double-stream blocks (it zips over the first
    ``num_layers`` processors, as for XLabs)."""

    counts_as_cross_attention = True

    def __init__(self, hidden_size, cross_attention_dim, num_tokens=(128,), scale=1.0, device=None, dtype=None,
                 adapter_ids=None, head_dim=128):
        num_tokens, ids = _ids_and_tokens(num_tokens, adapter_ids)
        FluxIPAdapterAttnProcessor.__init__(self, hidden_size, cross_attention_dim, [], 1.0, device, dtype)  # no biased K/V
        linear = lambda: torch.nn.Linear(cross_attention_dim, hidden_size, bias=False, device=device, dtype=dtype)  # noqa: E731
        self.to_k_ip = torch.nn.ModuleList([linear() for _ in ids])
        self.to_v_ip = torch.nn.ModuleList([linear() for _ in ids])
        self.norm_added_k = RMSNorm(head_dim, eps=1e-5, elementwise_affine=False)
        self.norm_added_v = RMSNorm(head_dim, eps=1e-5, elementwise_affine=False)
        self.init_streams(ids, num_tokens, scale)
        self.fallback_reason = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ip_hidden_states=None, ip_adapter_masks=None):
        out, text_len, ip_query = joint_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        ip = ip_branch(self, ip_query, ip_hidden_states)
        if encoder_hidden_states is None:  # single-stream: proj_out follows in the block
            return out if ip is None else out + ip
        encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        if ip is not None:
            out = out + ip
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(encoder_out)


# -- no IP-Adapter -----------------------------------------------------------------------
class FusedFluxAttnProcessor(DropInProcessor, FluxAttnProcessor):
    """``FluxAttnProcessor`` where editing methods attach (attention-map capture): the same
    math and outputs; diffusers' path whenever nothing observes the call."""

    def __init__(self):
        super().__init__()
        self.fallback_reason = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        out, text_len, _ = joint_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(encoder_out)


FLUX_IP_CLASSES = (FusedFluxIPAdapterAttnProcessor, FusedFluxInstantXAttnProcessor)
