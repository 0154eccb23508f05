"""Embeds scaling: where an IP-Adapter stream's weight ``w`` enters (ComfyUI_IPAdapter_plus'
``embeds_scaling``, ``CrossAttentionPatch.py``; re-derived, not copied).

With ``C`` the layer's hidden size (``heads * head_dim``) and ``k``, ``v`` the stream's
IP keys and values ``(B, T, C)``:

- ``V only``: the output times ``w`` (diffusers' and today's behaviour);
- ``K+V``: ``k * w`` and ``v * w`` (the layer's IP K/V weights times ``w``), output
  weight 1;
- ``K+V w/ C penalty``: ``k * w'`` and ``v * w'``, ``w' = w * C / 1280``;
- ``K+mean(V) w/ C penalty``: ``k * w'`` and ``v - mean(v) + w' * mean(v)`` (mean over
  the tokens).

``w`` is a 0-D tensor read from the processor's scale buffer, so nothing here reads a
value on the host.  The step gate stays an *output* factor in every mode: a closed gate
must give 0, which ``K+mean(V)`` with ``w = 0`` would not.
"""
from __future__ import annotations

import torch

V_ONLY = "V only"


def scale_embeds(k: torch.Tensor, v: torch.Tensor, w, mode: str):
    """``(k, v, output_factor)`` for ``mode``; ``k``/``v`` are ``(..., T, C)``, the factor is
    a 0-D float32 tensor when ``w`` is (the op's trusted path takes tensor scales)."""
    if mode == V_ONLY:
        return k, v, w
    one = torch.ones_like(w) if isinstance(w, torch.Tensor) else 1.0
    if mode != "K+V":
        w = w * (k.shape[-1] / 1280.0)
    k = k * w
    if mode == "K+mean(V) w/ C penalty":
        mean = v.mean(dim=-2, keepdim=True)  # over the tokens
        v = v - mean + mean * w
    else:
        v = v * w
    return k, v, one
