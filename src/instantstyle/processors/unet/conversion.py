"""diffusers' UNet processors -> ours: the whole UNet (:func:`use_fused_unet`), and one
layer where an editing method attaches (:func:`fused_equivalent`)."""
from __future__ import annotations

from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)
from diffusers.models.embeddings import MultiIPAdapterImageProjection

from ..core.model_state import default_caches, runs_pipeline
from ..targets.sites import ip_sites
from .fused_processor import FusedAttnProcessor, FusedIPAdapterAttnProcessor
from .image_projection import CachedImageProjection

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


def use_fused_unet(unet) -> dict:
    """Swap every IP-Adapter processor, and the plain processor of every cross-attention
    layer, of a diffusers UNet for the fused ones; returns ``{name: replaced processor}``.

    Self-attention, motion modules, the image projection's own attention and processors
    of other classes (e.g. a LoRA or custom processor) are left alone."""
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
    default_caches(unet)  # the per-run caches (core/step_cache.py), unless turned off
    return replaced
