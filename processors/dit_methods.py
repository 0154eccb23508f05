"""Editing methods on Flux/SD3 layers: which fused processor a layer needs, and which
methods joint attention supports (see ``joint_observe`` for what "cross"/"self" mean
there).

Attention-map capture (an observer, kind 5) works at Flux double-stream and SD3 joint
blocks.  Methods that change keys, values or queries (StyleAligned's shared reference,
Visual Style Prompting) would need the joint softmax rebuilt around the image part and
are refused with a one-line error until that exists.
"""
from __future__ import annotations

from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .conversion import _fuse_transformer_processor
from .contributors import kinds_of
from .flux import FusedFluxAttnProcessor
from .model_state import runs_pipeline
from .sd3 import FusedSD3JointAttnProcessor


def dit_plain_classes() -> tuple:
    """diffusers' stateless DiT processors (given back when the last method leaves a layer)."""
    return (FluxAttnProcessor, JointAttnProcessor2_0)


def check_dit_method(method) -> None:
    kinds = set(kinds_of(type(method)))
    if kinds != {5}:
        raise ValueError(
            f"method: {method.name} changes attention (contribution kinds {sorted(kinds)}); on Flux/SD3 joint attention "
            "only observers (attention-map capture, kind 5) are supported yet"
        )


def dit_equivalent(site: str, proc):
    """The fused processor for a Flux/SD3 layer that a method attaches to: ours as it is,
    a fused copy of diffusers' IP processor, or the plain fused processor."""
    if runs_pipeline(proc):
        return proc
    fused = _fuse_transformer_processor(proc)
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
