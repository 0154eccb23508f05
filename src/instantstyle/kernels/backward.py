"""The op's backward: which gradients a call needs, and the formulas in PyTorch.

Per batch element and head, stream 0 is the text softmax (joint keys share it) and
streams 1..S are the IP streams, each with its own softmax::

    S_s = tau Q K_s^T + B_s,  P_s = softmax(S_s),  O_s = P_s V_s,  O = sum_s w_s O_s

with w_0 = 1 and w_s = scale_s[b] * mask_s[b, n].  Given dO::

    D_s  = rowsum(dO * O_s)                  (per stream: rowsum(dO * O) mixes them)
    dS_s = w_s P_s * (dO V_s^T - D_s)
    dQ   = tau sum_s dS_s K_s,  dK_s = tau dS_s^T Q,  dV_s = P_s^T (w_s dO)
    dB_s = sum over heads and queries of dS_s           (biases are per key, (B, L))
    d scale_s[b] = sum_{n,h} mask_s[b, n] D_s,  d mask_s[b, n] = scale_s[b] sum_h D_s

:func:`torch_decoupled_attention_backward` writes exactly these (the torch backend's
backward, gradcheck-tested in float64); the Triton kernels in
:mod:`.triton_decoupled_bwd` compute the same quantities tile by tile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .inputs import AttentionInputs


@dataclass(frozen=True)
class GradNeeds:
    """Which of the op's inputs get a gradient (the kernels specialise on it)."""

    q: bool = False
    kv: bool = False  # text keys and values
    ip_kv: tuple = ()  # per IP stream
    ip_scale: bool = False
    ip_mask: bool = False
    text_bias: bool = False
    joint_kv: bool = False
    joint_bias: bool = False

    def ip_kv_of(self, s: int) -> bool:
        return s < len(self.ip_kv) and self.ip_kv[s]

    @property
    def any_ip_kv(self) -> bool:
        return any(self.ip_kv)

    @property
    def text_stream(self) -> bool:
        """Whether the text softmax's probabilities are needed at all."""
        return self.q or self.kv or self.text_bias or self.joint_kv or self.joint_bias

    def as_list(self) -> List[bool]:
        """The flat form the backward custom op takes (a schema allows ``bool[]``)."""
        return [self.q, self.kv, self.ip_scale, self.ip_mask, self.text_bias, self.joint_kv, self.joint_bias, *self.ip_kv]

    @classmethod
    def from_list(cls, flags) -> "GradNeeds":
        flags = [bool(f) for f in flags]
        return cls(flags[0], flags[1], tuple(flags[7:]), *flags[2:7])


def needs_of(inputs: AttentionInputs) -> GradNeeds:
    """Gradients the inputs ask for (``requires_grad``); K and V of a stream go together."""
    rg = lambda t: t is not None and t.requires_grad  # noqa: E731
    return GradNeeds(
        q=rg(inputs.q), kv=rg(inputs.k) or rg(inputs.v),
        ip_kv=tuple(rg(k) or rg(v) for k, v in zip(inputs.ip_k, inputs.ip_v)),
        ip_scale=rg(inputs.ip_scale), ip_mask=rg(inputs.ip_mask), text_bias=rg(inputs.text_bias),
        joint_kv=rg(inputs.joint_k) or rg(inputs.joint_v), joint_bias=rg(inputs.joint_bias),
    )


@dataclass
class Grads:
    """Gradients in the inputs' canonical shapes and dtypes; None where not needed."""

    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    ip_k: tuple = ()
    ip_v: tuple = ()
    ip_scale: Optional[torch.Tensor] = None
    ip_mask: Optional[torch.Tensor] = None
    text_bias: Optional[torch.Tensor] = None
    joint_k: Optional[torch.Tensor] = None
    joint_v: Optional[torch.Tensor] = None
    joint_bias: Optional[torch.Tensor] = None


def scale_and_mask_grads(inputs: AttentionInputs, delta_ip: torch.Tensor, needs: GradNeeds):
    """``(d ip_scale (S, B), d ip_mask (S, B, N))`` from the IP streams' ``D_s`` ``(S, B, H, N)``.

    Plain torch reductions on the host side of every backend: deterministic, and cheap
    next to the attention itself (S * B * H * N values)."""
    per_query = delta_ip.sum(dim=2)  # (S, B, N): summed over heads
    d_scale = d_mask = None
    if needs.ip_scale:
        weighted = per_query * inputs.ip_mask if inputs.ip_mask is not None else per_query
        d_scale = weighted.sum(dim=-1).to(inputs.ip_scale.dtype)
    if needs.ip_mask and inputs.ip_mask is not None:
        d_mask = (per_query * inputs.ip_scale[:, :, None]).to(inputs.ip_mask.dtype)
    return d_scale, d_mask


def _stream_backward(q, do, k, v, bias, weight, sm_scale):
    """One softmax's part of the backward, (B, H, L, D) layouts in the accumulation dtype.

    Returns ``(dq_part, dk, dv, dbias (B, L), delta (B, H, N))``."""
    logits = q @ k.transpose(-1, -2) * sm_scale
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    # Rows whose keys are all masked carry no weight (the op gives 0 there, as SDPA).
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    delta = (do * (probs @ v)).sum(dim=-1)  # D_s = rowsum(dO * O_s): this stream's output only
    w = 1.0 if weight is None else weight  # (B, 1, N, 1)
    ds = probs * (do @ v.transpose(-1, -2) - delta[..., None]) * w
    dq = ds @ k * sm_scale
    dk = ds.transpose(-1, -2) @ q * sm_scale
    dv = (probs * w).transpose(-1, -2) @ do
    return dq, dk, dv, ds.sum(dim=(1, 2)), delta


def torch_decoupled_attention_backward(inputs: AttentionInputs, dout: torch.Tensor, needs: GradNeeds) -> Grads:
    """The formulas of the module doc in PyTorch (materialises each stream's P_s)."""
    wide = inputs.ip_scale.dtype
    heads = lambda t: t.transpose(1, 2).to(wide)  # noqa: E731  (B, L, H, D) -> (B, H, L, D)
    back = lambda t, like: t.transpose(1, 2).to(like.dtype).contiguous()  # noqa: E731
    q, do = heads(inputs.q), heads(dout)
    grads = Grads()
    dq = torch.zeros_like(q) if needs.q else None
    if needs.text_stream:
        k, v, bias = inputs.joint_softmax_keys()
        dq_t, dk, dv, dbias, _ = _stream_backward(q, do, heads(k), heads(v), bias, None, inputs.sm_scale)
        if needs.q:
            dq += dq_t
        lt = inputs.k.shape[1]
        if needs.kv:
            grads.k, grads.v = back(dk[:, :, :lt], inputs.k), back(dv[:, :, :lt], inputs.v)
        if needs.joint_kv:
            grads.joint_k, grads.joint_v = back(dk[:, :, lt:], inputs.joint_k), back(dv[:, :, lt:], inputs.joint_v)
        if needs.text_bias and inputs.text_bias is not None:
            grads.text_bias = dbias[:, :lt].to(inputs.text_bias.dtype).contiguous()
        if needs.joint_bias and inputs.joint_bias is not None:
            grads.joint_bias = dbias[:, lt:].to(inputs.joint_bias.dtype).contiguous()
    ip_k, ip_v, deltas = [], [], []
    for s, (ik, iv) in enumerate(zip(inputs.ip_k, inputs.ip_v)):
        weight = inputs.ip_scale[s].view(-1, 1, 1, 1)
        if inputs.ip_mask is not None:
            weight = weight * inputs.ip_mask[s][:, None, :, None]
        dq_s, dk, dv, _, delta = _stream_backward(q, do, heads(ik), heads(iv), None, weight.to(wide), inputs.sm_scale)
        if needs.q:
            dq += dq_s
        ip_k.append(back(dk, ik) if needs.ip_kv_of(s) else None)
        ip_v.append(back(dv, iv) if needs.ip_kv_of(s) else None)
        deltas.append(delta)
    grads.ip_k, grads.ip_v = tuple(ip_k), tuple(ip_v)
    if deltas and (needs.ip_scale or needs.ip_mask):
        grads.ip_scale, grads.ip_mask = scale_and_mask_grads(inputs, torch.stack(deltas), needs)
    if needs.q:
        grads.q = back(dq, inputs.q)
    return grads
