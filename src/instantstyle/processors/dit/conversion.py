"""diffusers' Flux/SD3 processors -> ours: the whole transformer after diffusers'
``load_ip_adapter`` (:func:`use_fused_transformer`), and one layer where an editing
method attaches (:func:`dit_equivalent`)."""
from __future__ import annotations

from diffusers.models.attention_processor import (
    JointAttnProcessor2_0,
    SD3IPAdapterJointAttnProcessor2_0,
)
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxIPAdapterAttnProcessor,
)

from ..core.model_state import default_caches, runs_pipeline
from .flux import FusedFluxAttnProcessor, FusedFluxIPAdapterAttnProcessor
from .sd3 import FusedSD3IPAdapterJointAttnProcessor, FusedSD3JointAttnProcessor


def fuse_transformer_processor(proc):
    """A fused copy of diffusers' Flux/SD3 IP processor (same weights, scales, device,
    dtype, attention backend), or None for any other processor (left alone)."""
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


def use_fused_transformer(model) -> dict:
    current = model.attn_processors
    new, replaced = dict(current), {}
    for name, proc in current.items():
        fused = fuse_transformer_processor(proc)
        if fused is not None:
            new[name], replaced[name] = fused, proc
    if replaced:
        model.set_attn_processor(new)
    default_caches(model)  # the per-run caches (core/step_cache.py), unless turned off
    return replaced


def dit_plain_classes() -> tuple:
    """diffusers' stateless DiT processors (given back when the last method leaves a layer)."""
    return (FluxAttnProcessor, JointAttnProcessor2_0)


def dit_equivalent(site: str, proc):
    """The fused processor for a Flux/SD3 layer that a method attaches to: ours as it is,
    a fused copy of diffusers' IP processor, or the plain fused processor."""
    if runs_pipeline(proc):
        return proc
    fused = fuse_transformer_processor(proc)
    if fused is not None:
        return fused
    if type(proc) is FluxAttnProcessor:
        fused = FusedFluxAttnProcessor()
        fused._attention_backend = proc._attention_backend  # keep the layer's backend / context parallelism
        fused._parallel_config = proc._parallel_config
        return fused
    if type(proc) is JointAttnProcessor2_0:
        return FusedSD3JointAttnProcessor()
    raise TypeError(
        f"target: layer {site} runs a {type(proc).__name__}; instantstyle needs diffusers' FluxAttnProcessor, "
        "JointAttnProcessor2_0, a Flux/SD3 IP-Adapter processor or an instantstyle fused processor there"
    )
