"""diffusers integration: the per-layer engine, targeting, and one room per model family.

- ``core/``: the engine every fused processor runs (``engine.attend``: contributors ->
  ONE op call), the contributor protocol, step gates, the model's state and step hook,
  per-run caches, IP-Adapter's streams, the explicit diffusers patches.
- ``targets/``: sites (a model's attention layers), presets, architectures, the registry.
- ``unet/``: diffusers' ``Attention`` on UNets: parse/project, :class:`FusedIPAdapterAttnProcessor`,
  :class:`FusedAttnProcessor`, the cached image projection, conversion.
- ``dit/``: Flux and SD3.5: their processors, joint-attention method support, conversion.
- :func:`use_fused_processors` (``conversion``): the front door for every family.
- ``methods/`` (the layer above): :class:`EditingMethod`, :func:`apply_method`, ...

Names resolve lazily: most modules import diffusers (seconds), which the ``instantstyle``
CLI should not pay for when it only builds its argument parser.
"""
from ..kernels.lazy import lazy_exports

_EXPORTS = {
    "FusedIPAdapterAttnProcessor": ".unet.fused_processor",
    "FusedAttnProcessor": ".unet.fused_processor",
    "fallback_reasons": ".unet.fused_processor",
    "FusedFluxIPAdapterAttnProcessor": ".dit.flux",
    "FusedFluxInstantXAttnProcessor": ".dit.flux",
    "FusedFluxAttnProcessor": ".dit.flux",
    "FusedSD3IPAdapterJointAttnProcessor": ".dit.sd3",
    "FusedSD3JointAttnProcessor": ".dit.sd3",
    "use_fused_processors": ".conversion",
    "FusedWanAttnProcessor": ".wan.processor",
    "FusedSkyReelsV2AttnProcessor": ".wan.processor",
    "FusedChronoEditAttnProcessor": ".wan.processor",
    "FusedWanAnimateAttnProcessor": ".wan.processor",
    "set_image_scale": ".wan.image_scale",
    "image_scales": ".wan.image_scale",
    "InjectionRegistry": ".targets.registry",
    "registry_of": ".targets.registry",
    "pattern_matches": ".targets.registry",
    "PRESETS": ".targets.presets",
    "register_preset": ".targets.presets",
    "StepGate": ".core.gating",
    "CONFIGS": ".targets.architectures",
    "build_meta_unet": ".targets.architectures",
    "detect_arch": ".targets.architectures",
    "AttentionSite": ".targets.sites",
    "attention_sites": ".targets.sites",
    "ip_sites": ".targets.sites",
    "ip_key_ids": ".targets.sites",
    "Contributor": ".core.contributors",
    "clear_caches": ".core.model_state",
    "set_caches": ".core.model_state",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
