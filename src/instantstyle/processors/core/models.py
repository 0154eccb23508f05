"""Which diffusers model a call is about: the denoiser of a pipeline, its family (UNet,
Flux, SD3) and its attention modules.  The engine, the targets and every family's room
ask these questions; none of them needs to know how sites are named."""
from __future__ import annotations

from typing import Optional

#: diffusers' transformer classes with known sites, by class name (no import needed)
TRANSFORMER_FAMILIES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
                        # the Wan family: natively decoupled cross-attention (processors/wan)
                        "WanTransformer3DModel": "wan", "SkyReelsV2Transformer3DModel": "wan",
                        "ChronoEditTransformer3DModel": "wan", "WanAnimateTransformer3DModel": "wan"}


def transformer_family(model) -> Optional[str]:
    """``"flux"``, ``"sd3"``, ``"wan"`` or None (a UNet or anything else), from the model's class."""
    for cls in type(model).__mro__:
        if cls.__name__ in TRANSFORMER_FAMILIES:
            return TRANSFORMER_FAMILIES[cls.__name__]
    return None


def unet_of(model_or_pipeline):
    """The denoiser of a pipeline (``.unet``, or ``.transformer`` for DiT pipelines), or
    the model itself."""
    unet = getattr(model_or_pipeline, "unet", None)
    if unet is None:
        unet = getattr(model_or_pipeline, "transformer", None)
    if unet is None:
        unet = model_or_pipeline
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise TypeError(
            "model_or_pipeline: expected a diffusers UNet or transformer (with attn_processors) or a pipeline "
            f"with .unet or .transformer, got {type(model_or_pipeline).__name__}"
        )
    return unet


def attention_modules(model) -> dict:
    """``{attn_processors key: Attention module}``."""
    return {name + ".processor": m for name, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "heads")}
