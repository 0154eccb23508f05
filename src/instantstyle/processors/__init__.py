"""diffusers integration: fused attention processors and the injection registry.

- :class:`FusedIPAdapterAttnProcessor` / :class:`FusedAttnProcessor`: drop-in processors
  that run decoupled cross-attention as one fused op (``fused_processor``).
- :func:`use_fused_processors`: swap a loaded model's processors for them (``conversion``).
- :class:`InjectionRegistry` / :func:`registry_of`: targets (presets, patterns,
  ``set_ip_adapter_scale`` dicts) and what is injected where (``registry``).
- :class:`StepGate`: active range over the denoising schedule (``gating``).
- ``processors.methods`` (the layer above): :class:`EditingMethod`, :func:`apply_method`,
  :class:`StyleAligned`, :class:`VisualStylePrompting`, :class:`AttentionMapCapture`.

Names resolve lazily: most modules import diffusers (seconds), which the ``instantstyle``
CLI should not pay for when it only builds its argument parser.
"""
from ..kernels.lazy import lazy_exports

_EXPORTS = {
    "FusedIPAdapterAttnProcessor": ".fused_processor",
    "FusedAttnProcessor": ".fused_processor",
    "fallback_reasons": ".fused_processor",
    "use_fused_processors": ".conversion",
    "InjectionRegistry": ".registry",
    "registry_of": ".registry",
    "pattern_matches": ".registry",
    "PRESETS": ".presets",
    "register_preset": ".presets",
    "StepGate": ".gating",
    "CONFIGS": ".architectures",
    "build_meta_unet": ".architectures",
    "detect_arch": ".architectures",
    "AttentionSite": ".sites",
    "attention_sites": ".sites",
    "ip_sites": ".sites",
    "ip_key_ids": ".sites",
    "Contributor": ".contributors",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
