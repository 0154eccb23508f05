"""``use_fused_processors``: the one front door that swaps a loaded model's processors for
ours, whatever its family.  Each family's room knows its own classes
(``unet.conversion``, ``dit.conversion``)."""
from __future__ import annotations

from .core import diffusers_compat
from .core.models import transformer_family, unet_of
from .dit.conversion import use_fused_transformer
from .unet.conversion import use_fused_unet
from .wan.conversion import use_fused_wan


def use_fused_processors(model_or_pipeline) -> dict:
    """Swap every IP-Adapter processor, and the plain processor of every cross-attention
    layer, of a diffusers UNet or pipeline for the fused ones.

    Self-attention, motion modules, the image projection's own attention and processors
    of other classes (e.g. a LoRA or custom processor) are left alone.  On a Flux or SD3
    transformer (or its pipeline) it swaps ``FluxIPAdapterAttnProcessor`` and
    ``SD3IPAdapterJointAttnProcessor2_0``; plain joint attention stays diffusers' (long
    keys, SDPA / attention backends).  On a Wan-family transformer (Wan 2.1 I2V/FLF2V,
    SkyReels-V2, ChronoEdit, Wan-Animate) it swaps the processor of every cross-attention
    layer with an image branch (``processors.wan``); self-attention stays diffusers'.
    Returns ``{name: replaced processor}``.
    """
    model = unet_of(model_or_pipeline)
    diffusers_compat.register_processor_classes()
    family = transformer_family(model)
    if family == "wan":
        return use_fused_wan(model)
    if family is not None:
        return use_fused_transformer(model)
    return use_fused_unet(model)
