"""ComfyUI-style controls after (or during) ``load_ip_adapter``: weight types and embeds scaling.

``set_weight_type(pipe, "style transfer", weight=1.0)`` sets, per cross-attention module
of the type's map (``processors.targets.weight_types``), the layer scale of every IP
layer in it, exactly as diffusers' ``set_ip_adapter_scale`` with the matching
per-module dict would.  A module at 0 does no IP work (the eager processor skips an
adapter at scale 0: no K/V projection, no stream).  The precise types also turn on
the CFG-half swap at their modules.  Everything is checked before any layer changes.
"""
from __future__ import annotations

from typing import Dict, List

from ..processors.core.models import unet_of
from ..processors.targets.registry import registry_of
from ..processors.targets.weight_types import (
    check_embeds_scaling,
    check_weight_type,
    module_of,
    swapped_modules,
    weights_for,
)


def _adapters(procs, adapter) -> List[int]:
    counts = {len(p.num_tokens) for p in procs.values() if isinstance(getattr(p, "num_tokens", None), list)}
    n = max(counts) if counts else 1
    if adapter is None:
        return list(range(n))
    if isinstance(adapter, bool) or not isinstance(adapter, int) or not 0 <= adapter < n:
        raise ValueError(f"adapter: expected None or an index in [0, {n}), got {adapter!r}")
    return [adapter]


def site_values(model, weight_type, weight=1.0, composition_weight=None, arch=None) -> Dict[str, float]:
    """``{site name: value}`` over the IP-capable layers of ``model`` for the weight type."""
    check_weight_type(weight_type)
    registry = registry_of(model, arch)
    sites = registry.candidates("cross")
    modules = list(dict.fromkeys(module_of(s, registry.arch) for s in sites))
    dit = registry.arch in ("flux", "sd3")
    values = weights_for(registry.arch, weight_type, weight, composition_weight, modules if dit else None)
    missing = sorted(set(modules) - set(values))
    if missing:
        raise ValueError(f"model: expected the {registry.arch} cross-attention modules of the weight-type map, "
                         f"got modules outside it: {missing[:3]}")
    return {s.name: values[module_of(s, registry.arch)] for s in sites}


def apply_weight_type(procs, values: Dict[str, float], swapped: List[str], adapters: List[int]) -> None:
    """Check, then set scales (and swaps) on ``procs`` ({site name: processor})."""
    # a layer without an IP processor can't take IP at all (XLabs Flux: single blocks)
    values = {name: v for name, v in values.items() if hasattr(procs.get(name), "scale")}
    if not values:
        raise ValueError("model: expected IP-Adapter processors (run load_ip_adapter first), got none")
    for name, value in values.items():
        proc = procs[name]
        held = getattr(proc, "adapter_ids", adapters)
        lacking = [a for a in adapters if a not in held]
        if value != 0 and lacking:
            raise ValueError(f"weight_type: needs IP weights of adapter {lacking[0]} at {name}, which holds none; "
                             "load with this weight_type (or target='*') to hold them")
    for name, value in values.items():
        proc = procs[name]
        if not isinstance(proc.scale, list):  # SD3: one float per layer
            proc.scale = value
            continue
        for a in adapters:
            proc.scale[a] = value
            if hasattr(proc, "swap_halves"):
                proc.swap_halves[a] = any(name.startswith(m + ".") for m in swapped)


def set_weight_type(model_or_pipeline, weight_type, weight=1.0, composition_weight=None, adapter=None) -> Dict[str, float]:
    """Set a ComfyUI weight type on loaded IP-Adapters (all, or the ``adapter``-th).

    Returns ``{site name: value}``.  Types and their modules: README "Controls".
    """
    model = unet_of(model_or_pipeline)
    values = site_values(model, weight_type, weight, composition_weight)
    arch = registry_of(model).arch
    swapped = swapped_modules(arch, weight_type)
    procs = model.attn_processors
    apply_weight_type(procs, values, swapped, _adapters(procs, adapter))
    return values


def apply_embeds_scaling(procs, mode: str, adapters: List[int]) -> None:
    from ..processors.core.ip_adapter import IPAdapterStreams

    check_embeds_scaling(mode)
    ip = [p for p in procs.values() if hasattr(p, "scale") and hasattr(p, "to_k_ip")]
    if not ip:
        raise ValueError("model: expected IP-Adapter processors (run load_ip_adapter first), got none")
    for p in ip:
        supported = isinstance(p, IPAdapterStreams) and type(p).streams is IPAdapterStreams.streams
        if mode != "V only" and not supported:
            raise ValueError(f"embeds_scaling: {mode!r} is supported by UNet and XLabs-Flux IP layers, "
                             f"got a {type(p).__name__}; use 'V only'")
    for p in ip:
        if isinstance(p, IPAdapterStreams):
            for a in adapters:
                p.embeds_scaling[a] = mode


def set_embeds_scaling(model_or_pipeline, mode, adapter=None) -> None:
    """Where the IP weight enters: ``V only``, ``K+V``, ``K+V w/ C penalty``, ``K+mean(V) w/ C penalty``."""
    check_embeds_scaling(mode)
    procs = unet_of(model_or_pipeline).attn_processors
    apply_embeds_scaling(procs, mode, _adapters(procs, adapter))
