"""Checkpoints -> processors: IP-Adapters loaded into their target layers only.

- :func:`load_ip_adapter` / :class:`LoadReport` / :func:`ip_param_counts` (``loader``).
- :func:`read_checkpoint` and the original IP-Adapter layout (``checkpoints``).
- :func:`load_b_lora`: only the style or content block of a B-LoRA file (``b_lora``).
"""
from ..kernels.lazy import lazy_exports

_EXPORTS = {
    "load_ip_adapter": ".loader",
    "LoadReport": ".loader",
    "ip_param_counts": ".loader",
    "read_checkpoint": ".checkpoints",
    "set_weight_type": ".controls", "set_embeds_scaling": ".controls",
    "load_b_lora": ".b_lora",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
