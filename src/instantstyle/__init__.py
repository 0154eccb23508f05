"""instantstyle: fused decoupled cross-attention for IP-Adapter / InstantStyle."""
from .kernels.lazy import lazy_exports

__version__ = "0.1.0"

# Re-exported lazily: importing the processors imports diffusers (seconds), which
# ``import instantstyle`` and the kernels alone should not pay for.
_LAZY = {
    "use_fused_processors": "instantstyle.processors",
    "load_ip_adapter": "instantstyle.loaders",
    "set_weight_type": "instantstyle.loaders", "set_embeds_scaling": "instantstyle.loaders",
    "load_b_lora": "instantstyle.loaders",
    "FusedIPAdapterAttnProcessor": "instantstyle.processors",
    "registry_of": "instantstyle.processors",
    "apply_method": "instantstyle.processors.methods",
    "remove_method": "instantstyle.processors.methods",
    "AttendAndExcite": "instantstyle.processors.methods",
    "clear_caches": "instantstyle.processors",
    "set_caches": "instantstyle.processors",
    "set_image_scale": "instantstyle.processors",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
