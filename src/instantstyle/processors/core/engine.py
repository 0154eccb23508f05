"""The per-layer pipeline every fused processor runs between ``parse`` and ``project``:
collect the contributions of what is attached to the layer, in kind order
(transform_qk -> replace_kv -> joint_kv -> streams -> observe), gate them with
tensor ops, and end in ONE call: ``decoupled_attention``, or, when an observer needs
the probabilities or the op can't take the mask, the one unfused implementation
(``kernels.torch_backend``, same math, keeps the probabilities).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ...kernels import (
    decoupled_attention,
    normalize_inputs,
    processor_inputs,
    run_inputs,
)
from ...kernels.inputs import additive_bias
from ...kernels.torch_backend import torch_decoupled_attention
from .contributors import AttentionCall, Kind, kinds_of


@dataclass
class LayerInputs:
    """One layer call in the op's ``(B, L, H, D)`` layout, and what ``project`` needs."""

    q: torch.Tensor  # (B, N, H, D), a view of to_q's output
    k: torch.Tensor  # (B, Lt, H, D): text keys in cross-attention, own tokens in self-attention
    v: torch.Tensor
    text_bias: Optional[torch.Tensor]  # (B, Lt) key-padding mask the op takes, or None
    full_mask: Optional[torch.Tensor]  # (B, H|1, N|1, Lt) when the mask is not a key-padding one
    fallback_reason: Optional[str]  # why the fused op can't take these inputs (None: it can)
    ip_states: List[torch.Tensor]  # one tensor per IP-Adapter, as diffusers passes them
    residual: torch.Tensor
    input_shape: tuple  # hidden_states' shape before flattening (4-D inputs)
    ip_adapter_masks: object = None  # the call's ``ip_adapter_masks`` argument, untouched


def gate_of(contributor) -> Optional[torch.Tensor]:
    """The gate as a 0-D tensor, or None when it never closes (no blending needed)."""
    gate = getattr(contributor, "gate", None)
    return None if gate is None or gate.always_open else gate.value


def gated(gate, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    # torch.where, not a Python branch: a compiled graph reads the gate at run time
    return new if gate is None else torch.where(gate.to(new.device) > 0, new, old)


def _additive(bias: Optional[torch.Tensor], batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` additive bias in the op's bias dtype (bool: True = attend); zeros for None."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if bias is None:
        return torch.zeros((batch, length), dtype=dtype, device=like.device)
    return additive_bias(bias, dtype)


def apply_transform_qk(call: AttentionCall, entries) -> None:
    """Kind 4, in order: each contributor's new ``(q, k)`` replaces ``call``'s while its gate is open."""
    for contributor, weight in entries:
        call.weight = weight
        q, k = contributor.transform_qk(call)
        gate = gate_of(contributor)
        call.q, call.k = gated(gate, q, call.q), gated(gate, k, call.k)


def apply_replace_kv(call: AttentionCall, entries) -> None:
    """Kind 3, in order: each contributor's new ``(k, v)`` replaces ``call``'s while its gate is open."""
    for contributor, weight in entries:
        call.weight = weight
        k, v = contributor.replace_kv(call)
        gate = gate_of(contributor)
        call.k, call.v = gated(gate, k, call.k), gated(gate, v, call.v)


def collect_joint_kv(call: AttentionCall, entries) -> tuple:
    """Every contributor's joint keys, concatenated: ``(k, v, bias)`` or three Nones."""
    ks, vs, biases, any_bias = [], [], [], False
    for contributor, weight in entries:
        call.weight = weight
        got = contributor.joint_kv(call)
        if got is None:
            continue
        k, v, bias = got
        gate = gate_of(contributor)
        any_bias = any_bias or bias is not None or gate is not None
        bias = _additive(bias, k.shape[0], k.shape[1], k)
        if gate is not None:  # closed: log(0) = -inf hides the joint keys, exactly
            bias = bias + torch.log(gate.to(bias.device, bias.dtype))
        ks.append(k)
        vs.append(v)
        biases.append(bias)
    if not ks:
        return None, None, None
    cat = (lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts, dim=1))  # noqa: E731
    return cat(ks), cat(vs), (cat(biases) if any_bias else None)


def _scale_on(scale, device) -> object:
    """A stream scale as the op takes it: numbers stay numbers (no tensor built, no copy);
    tensors move to the queries' device."""
    return scale.to(device) if isinstance(scale, torch.Tensor) else scale


def _streams(call: AttentionCall, entries) -> list:
    out = []
    device = call.q.device
    for contributor, weight in entries:
        gate = gate_of(contributor)
        call.weight = weight
        for s in contributor.streams(call):
            if len(s) not in (3, 4):
                raise ValueError(f"{contributor.name}.streams: expected (k, v, scale) or (k, v, scale, mask) items, got {len(s)} values")
            scale = _scale_on(s[2], device)
            if gate is not None:
                scale = gate.to(device) * scale  # a 0-D tensor on the device, whatever scale was
            out.append((s[0], s[1], scale, s[3] if len(s) == 4 else None))
    return out


def _observers(call: AttentionCall, entries) -> list:
    """Observers that want this call.  Eager only: attention maps read values on the host."""
    return [c for c, _ in entries if Kind.OBSERVE in kinds_of(type(c)) and _isgate_of(c) and c.observing(call)]


def _isgate_of(contributor) -> bool:
    gate = gate_of(contributor)
    return gate is None or bool(gate > 0)  # a host read, but only for a gate that can close


def attend(layer: LayerInputs, entries: Sequence, site: str = "", info=None) -> torch.Tensor:
    """``(B, N, H, D)`` attention output of one layer with ``entries`` (``(contributor,
    weight)`` pairs, in attachment order) applied.  ``info``: the model's state (step,
    timestep, latent size) or None."""
    call = AttentionCall.at(site, info, layer.q, layer.k, layer.v, layer.text_bias, ip_states=layer.ip_states,
                            ip_adapter_masks=layer.ip_adapter_masks)
    kinds = [(c, w, kinds_of(type(c))) for c, w in entries]
    if layer.fallback_reason is None and all(c.trusted and k == (Kind.STREAMS,) for c, _, k in kinds):
        return _trusted_streams(call, entries)
    by_kind = lambda kind: [(c, w) for c, w, k in kinds if kind in k]  # noqa: E731
    apply_transform_qk(call, by_kind(Kind.TRANSFORM_QK))
    apply_replace_kv(call, by_kind(Kind.REPLACE_KV))
    joint_k, joint_v, joint_bias = collect_joint_kv(call, by_kind(Kind.JOINT_KV))
    streams = _streams(call, by_kind(Kind.STREAMS))
    observers = _observers(call, by_kind(Kind.OBSERVE))
    ip_k, ip_v = [s[0] for s in streams], [s[1] for s in streams]
    scales, masks = [s[2] for s in streams], [s[3] for s in streams]
    if not observers and layer.fallback_reason is None:
        return decoupled_attention(call.q, call.k, call.v, ip_k, ip_v, scales, masks, call.text_bias,
                                   joint_k=joint_k, joint_v=joint_v, joint_bias=joint_bias)
    inputs = normalize_inputs(call.q, call.k, call.v, ip_k, ip_v, scales, masks, None if layer.full_mask is not None else call.text_bias,
                              None, joint_k, joint_v, joint_bias)
    if not observers:
        return torch_decoupled_attention(inputs, attn_mask=layer.full_mask)
    out, probs = torch_decoupled_attention(inputs, attn_mask=layer.full_mask, keep_probs=True)
    for observer in observers:
        observer.observe(call, probs)
    return out


def _trusted_streams(call: AttentionCall, entries) -> torch.Tensor:
    """The hot path (a layer with IP-Adapter or nothing attached): contributions built by
    our own code from the layer's projections skip the op's argument checks."""
    streams = [s for c, w in entries for s in c.streams(call)]
    ks, vs, scales, masks = zip(*streams) if streams else ((), (), (), ())
    if any(m is not None for m in masks):  # masked images: the checked path handles them
        return decoupled_attention(call.q, call.k, call.v, ks, vs, scales, masks, call.text_bias)
    return run_inputs(processor_inputs(call.q, call.k, call.v, ks, vs, scales, call.text_bias))
