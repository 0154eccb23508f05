"""diffusers' processors -> ours: ``use_fused_processors`` for a whole model (UNet, or
Flux/SD3 transformer), and ``fused_equivalent`` for one layer (what editing methods
need where they attach)."""
from __future__ import annotations

from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)
from diffusers.models.embeddings import MultiIPAdapterImageProjection

from . import diffusers_compat
from .fused_processor import FusedAttnProcessor, FusedIPAdapterAttnProcessor
from .image_projection import CachedImageProjection
from .model_state import runs_pipeline
from .sites import ip_sites, transformer_family, unet_of

IP_CLASSES = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)
PLAIN_CLASSES = (AttnProcessor, AttnProcessor2_0)


def fuse_ip_processor(proc) -> FusedIPAdapterAttnProcessor:
    """A fused copy of a diffusers IP processor: same weights, scales, device and dtype."""
    weight = proc.to_k_ip[0].weight if len(proc.to_k_ip) else None
    fused = FusedIPAdapterAttnProcessor(proc.hidden_size, proc.cross_attention_dim, list(proc.num_tokens), list(proc.scale))
    if weight is not None:
        fused.to(device=weight.device, dtype=weight.dtype)
    fused.load_state_dict(proc.state_dict())
    return fused


def fused_equivalent(site: str, proc):
    """The fused processor that runs what is attached at ``site``: ``proc`` itself when it
    is ours, else a fused copy of a diffusers IP or plain processor."""
    if runs_pipeline(proc):
        return proc
    if isinstance(proc, IP_CLASSES):
        return fuse_ip_processor(proc)
    if type(proc) in PLAIN_CLASSES:
        return FusedAttnProcessor()
    raise TypeError(
        f"target: layer {site} runs a {type(proc).__name__}; instantstyle needs diffusers' "
        "AttnProcessor(2_0), an IP-Adapter processor or an instantstyle fused processor there"
    )


def _fuse_transformer_processor(proc):
    """A fused copy of diffusers' Flux/SD3 IP processor (same weights, scales, device,
    dtype, attention backend), or None for any other processor (left alone)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    from .flux import FusedFluxIPAdapterAttnProcessor
    from .sd3 import FusedSD3IPAdapterJointAttnProcessor

    if runs_pipeline(proc):
        return None
    if isinstance(proc, FluxIPAdapterAttnProcessor):
        weight = proc.to_k_ip[0].weight if len(proc.to_k_ip) else None
        fused = FusedFluxIPAdapterAttnProcessor(proc.hidden_size, proc.cross_attention_dim, [4] * len(proc.to_k_ip), list(proc.scale))
    elif isinstance(proc, SD3IPAdapterJointAttnProcessor2_0):
        weight = proc.to_k_ip.weight
        fused = FusedSD3IPAdapterJointAttnProcessor(
            proc.to_k_ip.out_features, proc.to_k_ip.in_features, proc.norm_q.dim[0],
            proc.norm_ip.linear.in_features, proc.scale,
        )
    else:
        return None
    if weight is not None:
        fused.to(device=weight.device, dtype=weight.dtype)
    fused.load_state_dict(proc.state_dict())
    fused._attention_backend = getattr(proc, "_attention_backend", None)
    fused._parallel_config = getattr(proc, "_parallel_config", None)
    return fused


def _use_fused_transformer(model) -> dict:
    current = model.attn_processors
    new, replaced = dict(current), {}
    for name, proc in current.items():
        fused = _fuse_transformer_processor(proc)
        if fused is not None:
            new[name], replaced[name] = fused, proc
    if replaced:
        model.set_attn_processor(new)
    return replaced


def use_fused_processors(model_or_pipeline) -> dict:
    """Swap every IP-Adapter processor, and the plain processor of every cross-attention
    layer, of a diffusers UNet or pipeline for the fused ones.

    Self-attention, motion modules, the image projection's own attention and processors
    of other classes (e.g. a LoRA or custom processor) are left alone.  On a Flux or SD3
    transformer (or its pipeline) it swaps ``FluxIPAdapterAttnProcessor`` and
    ``SD3IPAdapterJointAttnProcessor2_0``.  Returns ``{name: replaced processor}``.
    """
    unet = unet_of(model_or_pipeline)
    diffusers_compat.register_processor_classes()
    if transformer_family(unet) is not None:
        # DiT: the IP processors diffusers' load_ip_adapter installed; plain joint
        # attention stays diffusers' (long keys, SDPA / attention backends)
        return _use_fused_transformer(unet)
    current = unet.attn_processors
    replaced = {}
    new = dict(current)
    for site in ip_sites(unet):
        proc = current[site.name]
        if runs_pipeline(proc) or not (isinstance(proc, IP_CLASSES) or type(proc) in PLAIN_CLASSES):
            continue
        new[site.name] = fused_equivalent(site.name, proc)
        replaced[site.name] = proc
    if replaced:
        unet.set_attn_processor(new)
    if type(getattr(unet, "encoder_hid_proj", None)) is MultiIPAdapterImageProjection:
        # same layers, projected once per run instead of once per step (``step_cache``)
        unet.encoder_hid_proj = CachedImageProjection.wrapping(unet.encoder_hid_proj)
    return replaced
