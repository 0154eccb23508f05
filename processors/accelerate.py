"""``use_fused_processors``: swap an already-loaded model's processors for the fused ones."""
from __future__ import annotations

from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)

from .fused_processor import FusedAttnProcessor, FusedIPAdapterAttnProcessor
from .sites import ip_sites, unet_of

_IP_CLASSES = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)
_PLAIN_CLASSES = (AttnProcessor, AttnProcessor2_0)


def fuse_ip_processor(proc) -> FusedIPAdapterAttnProcessor:
    """A fused copy of a diffusers IP processor: same weights, scales, device and dtype."""
    weight = proc.to_k_ip[0].weight if len(proc.to_k_ip) else None
    fused = FusedIPAdapterAttnProcessor(proc.hidden_size, proc.cross_attention_dim, list(proc.num_tokens), list(proc.scale))
    if weight is not None:
        fused.to(device=weight.device, dtype=weight.dtype)
    fused.load_state_dict(proc.state_dict())
    return fused


def use_fused_processors(model_or_pipeline) -> dict:
    """Swap every IP-Adapter processor, and the plain processor of every cross-attention
    layer, of a diffusers UNet or pipeline for the fused ones.

    Self-attention, motion modules, the image projection's own attention and processors
    of other classes (e.g. a LoRA or custom processor) are left alone.  Returns
    ``{name: replaced processor}``.
    """
    unet = unet_of(model_or_pipeline)
    current = unet.attn_processors
    replaced = {}
    new = dict(current)
    for site in ip_sites(unet):
        proc = current[site.name]
        if isinstance(proc, (FusedIPAdapterAttnProcessor, FusedAttnProcessor)):
            continue
        if isinstance(proc, _IP_CLASSES):
            new[site.name] = fuse_ip_processor(proc)
        elif type(proc) in _PLAIN_CLASSES:
            new[site.name] = FusedAttnProcessor()
        else:
            continue
        replaced[site.name] = proc
    if replaced:
        unet.set_attn_processor(new)
    return replaced
