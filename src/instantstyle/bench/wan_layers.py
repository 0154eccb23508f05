"""Wan 2.1 I2V cross-attention layers for the processor suite: one whole ``attn2`` call
(q/k RMSNorm across heads, text K/V, the image branch's K/V, both softmaxes, ``to_out``),
as ``WanTransformerBlock`` makes it.

- ``diffusers`` (baseline): ``WanAttnProcessor``, two attention calls (text, image) and an add;
- ``fused``: ``instantstyle.processors.wan.FusedWanAttnProcessor``, one op call;
- ``no-ip``: diffusers' processor on a copy of the layer without the image branch, text keys
  only (the floor the image branch adds to).

Full size: 40 heads x 128 (dim 5120), 512 text tokens, 257 CLIP image tokens (FLF2V: 514),
CFG batch 2 (Wan's pipelines run cond and uncond as two calls; B = 2 is the batched
equivalent the issue asks for).  Queries: 480x832 at 81 frames -> 21 x 30 x 52 = 32,760;
720x1280 -> 21 x 45 x 80 = 75,600.
"""
from __future__ import annotations

import torch

WAN_HEADS, WAN_DIM, WAN_TEXT = 40, 128, 512


class TextOnly:
    """diffusers' ``WanAttnProcessor`` on a copy of the layer with no image branch, fed
    the text part of the context: the layer's cost without the image branch."""

    def __init__(self, attn):
        from diffusers.models.transformers.transformer_wan import (
            WanAttention,
            WanAttnProcessor,
        )

        self.text_attn = WanAttention(dim=attn.to_q.in_features, heads=attn.heads, dim_head=attn.to_q.out_features // attn.heads,
                                      eps=attn.norm_q.eps, cross_attention_dim_head=attn.to_q.out_features // attn.heads,
                                      processor=WanAttnProcessor())
        self.text_attn.load_state_dict({k: v for k, v in attn.state_dict().items() if k in self.text_attn.state_dict()})
        self.text_attn.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype).eval()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        text = encoder_hidden_states[:, -WAN_TEXT:]
        return self.text_attn.processor(self.text_attn, hidden_states, text, attention_mask, None)


def build_wan(case, dtype, device, fused_cls):
    from diffusers.models.transformers.transformer_wan import (
        WanAttention,
        WanAttnProcessor,
    )

    torch.manual_seed(0)
    inner = case.heads * (case.channels // case.heads)
    attn = WanAttention(dim=case.channels, heads=case.heads, dim_head=case.channels // case.heads, eps=1e-6,
                        added_kv_proj_dim=inner, cross_attention_dim_head=case.channels // case.heads,
                        processor=WanAttnProcessor())
    for norm in (attn.norm_q, attn.norm_k):  # trained-looking norm weights, not all ones
        norm.weight.data.uniform_(0.5, 1.5)
    attn.to(device=device, dtype=dtype).eval()
    procs = {"diffusers": WanAttnProcessor(), "no-ip": TextOnly(attn)}
    if fused_cls is not None:
        procs["fused"] = fused_cls()
    return attn, procs


def inputs(case, dtype, device, seed):
    """``(x, context)``: queries ``(B, N, C)`` and the context ``[image ; text]`` ``(B, Li + 512, C)``."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device=device, dtype=dtype)  # noqa: E731
    return rand(case.B, case.N, case.channels), rand(case.B, case.ip_tokens + case.Lt, case.channels)


def call(module, args, ip: bool):
    """One ``attn2`` call (every provider gets the whole context; ``no-ip`` reads its text part)."""
    x, context = args
    with torch.inference_mode():
        return module(x, context, None, None)


def fused_class():
    try:
        from instantstyle.processors.wan.processor import FusedWanAttnProcessor
    except Exception:
        return None
    return FusedWanAttnProcessor
