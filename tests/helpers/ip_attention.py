"""One diffusers ``Attention`` layer with diffusers' ``IPAdapterAttnProcessor2_0`` (random IP
weights) and our fused copy of it, the inputs it takes, and a run of both on the same layer."""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from instantstyle.processors.unet.conversion import fuse_ip_processor

DIM, CROSS, HEADS = 32, 24, 4


def make_attn(dtype=torch.float64, **kwargs):
    torch.manual_seed(1)
    attn = Attention(DIM, cross_attention_dim=CROSS, heads=HEADS, dim_head=DIM // HEADS, **kwargs).to(dtype)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return attn.eval()


def make_pair(num_tokens=(4,), scale=1.0, dtype=torch.float64, seed=2):
    """diffusers' processor with random IP weights, and our fused copy of it."""
    torch.manual_seed(seed)
    ref = IPAdapterAttnProcessor2_0(DIM, CROSS, num_tokens=list(num_tokens), scale=scale).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    return ref, fuse_ip_processor(ref)


def ip_states(batch, n_images, tokens, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n_images, tokens, CROSS, generator=g).to(dtype)


def run_both(attn, ref, ours, hidden, encoder, **kwargs):
    """``(ours, diffusers')`` outputs of ``attn`` on the same inputs."""
    with torch.no_grad():
        attn.set_processor(ref)
        expected = attn(hidden, encoder_hidden_states=encoder, **kwargs)
        attn.set_processor(ours)
        got = attn(hidden, encoder_hidden_states=encoder, **kwargs)
    return got, expected


def inputs(batch=2, n=12, lt=7, adapters=((1, 4),), seed=0, dtype=torch.float64):
    """``hidden, (text, ip_states)``; ``adapters`` is ``(images, tokens)`` per adapter."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, n, DIM, generator=g).to(dtype)
    text = torch.randn(batch, lt, CROSS, generator=g).to(dtype)
    ips = [ip_states(batch, n_img, tok, seed + 10 + i, dtype) for i, (n_img, tok) in enumerate(adapters)]
    return hidden, (text, ips)
