"""Flux and SD3.5 attention layers for the processor suite: one whole joint-attention call
(projections, norms, RoPE, the long-key main attention and the IP branch), as the
transformer makes it, with diffusers' IP processor (baseline), ours, and the layer
without IP (the floor).

- Flux double-stream block (FLUX.1-dev): 24 heads x 128, joint_attention_dim 4096 for
  the IP tokens (XLabs: K/V Linear with bias), RoPE over [text ; image], batch 1 (Flux
  is guidance-distilled: no CFG batch).
- SD3.5-Large joint block: 38 heads x 64 (2432 ch), qk RMSNorm, 333 text tokens
  (77 CLIP + 256 T5), CFG batch 2; InstantX IP tokens (64) through AdaLayerNorm(temb
  1280) into the processor's second near-full attention over [image ; IP] keys.
"""
from __future__ import annotations

import torch

FLUX_HEADS, FLUX_DIM, FLUX_JOINT = 24, 128, 4096
SD3_HEADS, SD3_DIM, SD3_TEMB = 38, 64, 1280


def _rope(length: int, dim: int, dtype, device):
    """Flux-style (cos, sin) of shape ``(L, D)``, as ``FluxPosEmbed`` returns them."""
    freqs = torch.outer(torch.arange(length, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    cos, sin = freqs.cos().repeat_interleave(2, dim=1), freqs.sin().repeat_interleave(2, dim=1)
    return cos.to(device=device, dtype=torch.float32), sin.to(device=device, dtype=torch.float32)


def build_flux(case, dtype, device, fused_cls):
    from diffusers.models.transformers.transformer_flux import (
        FluxAttention,
        FluxAttnProcessor,
        FluxIPAdapterAttnProcessor,
    )

    torch.manual_seed(0)
    inner = FLUX_HEADS * FLUX_DIM
    attn = FluxAttention(query_dim=inner, heads=FLUX_HEADS, dim_head=FLUX_DIM, added_kv_proj_dim=inner, bias=True,
                         context_pre_only=False, eps=1e-6)
    base = FluxIPAdapterAttnProcessor(inner, FLUX_JOINT, num_tokens=(case.ip_tokens,), scale=1.0)
    procs = {"diffusers": base, "no-ip": FluxAttnProcessor()}
    if fused_cls is not None:
        procs["fused"] = fused_cls(inner, FLUX_JOINT, (case.ip_tokens,), 1.0)
        procs["fused"].load_state_dict(base.state_dict())
    return attn, procs


def build_sd3(case, dtype, device, fused_cls):
    from diffusers.models.attention_processor import (
        Attention,
        JointAttnProcessor2_0,
        SD3IPAdapterJointAttnProcessor2_0,
    )

    torch.manual_seed(0)
    inner = SD3_HEADS * SD3_DIM
    attn = Attention(query_dim=inner, cross_attention_dim=None, added_kv_proj_dim=inner, dim_head=SD3_DIM, heads=SD3_HEADS,
                     out_dim=inner, context_pre_only=False, bias=True, qk_norm="rms_norm", eps=1e-6,
                     processor=JointAttnProcessor2_0())
    base = SD3IPAdapterJointAttnProcessor2_0(inner, inner, SD3_DIM, SD3_TEMB, scale=1.0)
    procs = {"diffusers": base, "no-ip": JointAttnProcessor2_0()}
    if fused_cls is not None:
        procs["fused"] = fused_cls(inner, inner, SD3_DIM, SD3_TEMB, 1.0)
        procs["fused"].load_state_dict(base.state_dict())
    return attn, procs


def inputs(case, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device=device, dtype=dtype)  # noqa: E731
    if case.family == "flux":
        inner = FLUX_HEADS * FLUX_DIM
        return (rand(case.B, case.N, inner), rand(case.B, case.Lt, inner), _rope(case.Lt + case.N, FLUX_DIM, dtype, device),
                [rand(case.B, case.ip_tokens, FLUX_JOINT)])
    inner = SD3_HEADS * SD3_DIM
    return rand(case.B, case.N, inner), rand(case.B, case.Lt, inner), rand(case.B, SD3_TEMB), rand(case.B, case.ip_tokens, inner)


def call(module, args, ip: bool):
    """One layer call; the image-stream output (what differs between processors)."""
    with torch.inference_mode():
        if len(args) == 4 and isinstance(args[2], tuple):  # Flux
            x, text, rope, ip_states = args
            out = module(x, encoder_hidden_states=text, image_rotary_emb=rope, **({"ip_hidden_states": ip_states} if ip else {}))
            return out[0] + out[2] if ip else out[0]  # the block adds the IP output to the image stream
        x, text, temb, ip_states = args
        out = module(x, encoder_hidden_states=text, **({"ip_hidden_states": ip_states, "temb": temb} if ip else {}))
        return out[0]


def fused_classes():
    """``{"flux": cls, "sd3": cls}`` of our processors (None for a missing one)."""
    try:
        from instantstyle.processors.dit.flux import FusedFluxIPAdapterAttnProcessor
        from instantstyle.processors.dit.sd3 import FusedSD3IPAdapterJointAttnProcessor
    except Exception:
        return {"flux": None, "sd3": None}
    return {"flux": FusedFluxIPAdapterAttnProcessor, "sd3": FusedSD3IPAdapterJointAttnProcessor}
