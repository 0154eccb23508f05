"""Editing methods on DiT joint attention (Flux double-stream, SD3 joint blocks): what
"cross" and "self" mean there, and attention-map capture.

A joint block runs ONE softmax over [text ; image] (Flux) or [image ; text] (SD3): every
image query attends to the text tokens and to the image tokens together.  So on DiTs:

- **cross** = the image-query rows x text-key columns of that softmax (the counterpart of
  a UNet's attn2): attention maps are read there;
- **self** = the image-query rows x image-key columns of the same softmax (a UNet's attn1).

The probabilities are normalised over the whole joint sequence, not over the text alone,
so a DiT map row sums to the share of attention that went to the text (< 1); compare
maps between tokens and layers, not in absolute value against a UNet's.

Flux's single-stream blocks receive text and image as one sequence; the model's step hook
records where the text ends (``model_state``), so maps are captured there too.  Capturing
materialises the probabilities ``(B, H, L, L)`` of a layer (Flux-dev at 1024²: ~2 GB fp32
per image), only at the steps where an observer wants them, through the one unfused
implementation (``kernels.torch_backend``); every other call keeps diffusers' path.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...kernels import normalize_inputs
from ...kernels.torch_backend import torch_decoupled_attention
from ..core.contributors import AttentionCall, Kind, kinds_of
from ..core.model_state import attached_at


def _wanted(entries, call: AttentionCall) -> list:
    """Observers (kind 5) whose gate is open and that want this call, with their weights."""
    out = []
    for entry in entries:
        c = entry.contributor
        if Kind.OBSERVE not in kinds_of(type(c)):
            continue
        gate = getattr(c, "gate", None)
        call.weight = entry.weight
        if (gate is None or bool(gate.value > 0)) and c.observing(call):
            out.append((c, entry.weight))
    return out


def observed_joint_attention(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_len: int,
                             image_first: bool, attention_mask=None) -> Optional[torch.Tensor]:
    """``(B, L, H, D)`` joint attention computed with its probabilities kept, handed to the
    observers attached at ``attn`` as ``(B, H, N_image, text + image)`` (text columns
    first, as for UNet cross-attention); None when nothing observes this call (the caller
    then runs diffusers' attention).  q/k/v are ``(B, L, H, D)``, after norms and RoPE."""
    entries = attached_at(attn)
    if not entries or text_len <= 0:
        return None
    length = query.shape[1]
    txt = slice(length - text_len, length) if image_first else slice(0, text_len)
    img = slice(0, length - text_len) if image_first else slice(text_len, length)
    info = entries[0].state
    call = AttentionCall.at(entries[0].site, info, query[:, img], key[:, txt], value[:, txt],
                            sample_size=None)  # no latent grid on a joint sequence
    observers = _wanted(entries, call)
    if not observers:
        return None
    inputs = normalize_inputs(query, key, value)
    mask = None if attention_mask is None else attention_mask.to(query.device)  # SDPA's convention, as diffusers
    out, probs = torch_decoupled_attention(inputs, attn_mask=mask, keep_probs=True)
    rows = probs[:, :, img]
    rows = torch.cat([rows[..., txt], rows[..., img]], dim=-1)
    for contributor, weight in observers:
        call.weight = weight
        contributor.observe(call, rows)
    return out
