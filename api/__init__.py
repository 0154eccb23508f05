"""instantstyle: fused decoupled cross-attention for IP-Adapter / InstantStyle."""
__version__ = "0.1.0"

# Re-exported lazily: importing the processors imports diffusers (seconds), which
# ``import instantstyle`` and the kernels alone should not pay for.
_LAZY = {
    "use_fused_processors": "instantstyle.processors",
    "load_ip_adapter": "instantstyle.processors",
    "FusedIPAdapterAttnProcessor": "instantstyle.processors",
    "registry_of": "instantstyle.processors",
    "apply_method": "instantstyle.processors",
    "remove_method": "instantstyle.processors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'instantstyle' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
