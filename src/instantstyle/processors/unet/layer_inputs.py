"""The family-specific ends of the per-layer pipeline, for diffusers' ``Attention``:
``parse`` turns a processor call into :class:`LayerInputs`, ``project`` turns the
attention output back into the processor's return value.

The steps and their order are those of diffusers' ``AttnProcessor2_0`` /
``IPAdapterAttnProcessor2_0`` (spatial norm, 4-D -> tokens, group norm, projections,
norm_cross, ``norm_q``/``norm_k``; then out-projection, residual, rescale), so the fused
processors honour every option diffusers' own processors honour.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.engine import LayerInputs
from ..core.ip_pairing import paired_ip_states
from ..core.projections import linear, plain_linear, weights
from ..core.step_cache import StepCache


def _text_kv(attn, text_states: torch.Tensor, cache: Optional[StepCache]):
    """Cross-attention keys and values of the text.  A pipeline passes the same prompt
    embeddings at every step, so within one denoising run, while they and the projections
    are unchanged, the last result is reused (``cache``, the processor's: see
    ``step_cache``, which also keys on the run, device and autocast state): two
    projections less per layer and step.  Only for bare projections without norm_cross,
    whose output depends on nothing else."""
    def project():
        return linear(attn.to_k, text_states), linear(attn.to_v, text_states)

    if attn.norm_cross:
        text_states = attn.norm_encoder_hidden_states(text_states)
        return project()
    to_k, to_v = attn.to_k, attn.to_v
    if cache is None or not (plain_linear(to_k) and plain_linear(to_v)):
        return project()
    return cache.get((text_states, *weights(to_k), *weights(to_v)), project)


def split_encoder_states(encoder_hidden_states, num_ip_tokens: Optional[int] = None):
    """``(text, [ip per adapter])`` tuple -> (text, ip list); a plain tensor has no IP part.

    ``num_ip_tokens`` supports diffusers' deprecated layout (IP tokens appended to the
    text tokens) for processors that hold an adapter.
    """
    if isinstance(encoder_hidden_states, tuple):
        text, ip = encoder_hidden_states
        return text, list(ip)
    if encoder_hidden_states is not None and num_ip_tokens:
        end = encoder_hidden_states.shape[1] - num_ip_tokens
        return encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]]
    return encoder_hidden_states, []


def _key_padding_bias(attention_mask: torch.Tensor, batch: int, lt: int) -> Optional[torch.Tensor]:
    """The mask as a ``(B, Lt)`` bias when it is one (same for every head and query), else None.

    diffusers repeats a ``(B, 1, Lt)`` or ``(B, Lt)`` mask over heads, so those shapes are
    per-key biases; a ``(B*H, ...)`` or per-query mask is not.
    """
    m = attention_mask
    if m.shape[-1] != lt or m.shape[0] != batch:
        return None
    if m.dim() == 2:
        return m
    if m.dim() == 3 and m.shape[1] == 1:
        return m[:, 0]
    return None


def parse(attn, hidden_states, encoder_hidden_states, attention_mask, temb, num_ip_tokens=None, ip_adapter_masks=None,
          text_cache: Optional[StepCache] = None) -> LayerInputs:
    residual = hidden_states
    text_states, ip_states = split_encoder_states(encoder_hidden_states, num_ip_tokens)
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_shape = tuple(hidden_states.shape)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = linear(attn.to_q, hidden_states)
    if text_states is None:  # self-attention: keys change with every step
        key, value = linear(attn.to_k, hidden_states), linear(attn.to_v, hidden_states)
    else:
        key, value = _text_kv(attn, text_states, text_cache)
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    q = query.view(batch, -1, heads, head_dim)
    k = key.view(batch, -1, heads, head_dim)
    # qk-norm (DiT-style attention): per head over head_dim, as diffusers applies it on
    # the (B, H, L, D) view; on our (B, L, H, D) view the normalised axis is the same.
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    lt = k.shape[1]

    text_bias = full_mask = reason = None
    if attention_mask is not None:
        text_bias = _key_padding_bias(attention_mask, batch, lt)
        if text_bias is None:
            reason = (
                f"attention_mask of shape {tuple(attention_mask.shape)} varies per head or query "
                f"(the fused op takes a (B, Lt) = ({batch}, {lt}) key-padding mask)"
            )
            full_mask = attn.prepare_attention_mask(attention_mask, lt, batch)
            full_mask = full_mask.view(batch, -1, full_mask.shape[-2], full_mask.shape[-1])
    return LayerInputs(
        q=q,
        k=k,
        v=value.view(batch, -1, heads, head_dim),
        text_bias=text_bias,
        full_mask=full_mask,
        fallback_reason=reason,
        ip_states=paired_ip_states(ip_states, batch),
        residual=residual,
        input_shape=input_shape,
        ip_adapter_masks=ip_adapter_masks,
    )


def project(attn, out: torch.Tensor, layer: LayerInputs) -> torch.Tensor:
    """``(B, N, H, D)`` attention output -> the processor's return value."""
    hidden_states = out.reshape(out.shape[0], out.shape[1], -1)
    if hidden_states.dtype != layer.q.dtype:
        hidden_states = hidden_states.to(layer.q.dtype)
    for module in attn.to_out:  # linear, dropout (iterating: indexing a ModuleList is slow Python)
        if type(module) is torch.nn.Dropout and (not module.training or module.p == 0):
            continue  # the identity, minus a module call
        hidden_states = linear(module, hidden_states)
    if len(layer.input_shape) == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(layer.input_shape)
    if attn.residual_connection:
        hidden_states = hidden_states + layer.residual
    factor = attn.rescale_output_factor
    return hidden_states if factor == 1.0 else hidden_states / factor
