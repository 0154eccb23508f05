"""Editing methods on Flux/SD3 layers: which fused processor a layer needs, and which
methods joint attention supports (see ``joint_observe`` for what "cross"/"self" mean
there).

Attention-map capture (an observer, kind 5) works at Flux double-stream and SD3 joint
blocks.  Methods that change queries, keys or values (kinds 2-4: StyleAligned's shared
reference) work there too, on the image part of the joint sequence (``joint_methods``).
Methods with streams of their own (kind 1) are refused with a one-line error: on Flux
the IP-Adapter branch is the only stream, and it has its own output path.

Step gates on DiTs: flow-matching transformers take sigma (Flux, 0..1) or
``1000 * sigma`` (SD3) as their timestep, so ``start_at``/``end_at`` are fractions of
that range (:func:`dit_gate_steps`): open while ``1 - end_at <= sigma <= 1 - start_at``.
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
    if 1 in kinds:
        raise ValueError(
            f"method: {method.name} adds attention streams (contribution kinds {sorted(kinds)}); on Flux/SD3 joint attention "
            "only kinds 2-5 (transform_qk, replace_kv, joint_kv, observe) are supported"
        )


def dit_gate_steps(family: str) -> int:
    """``num_train_timesteps`` for a method's StepGate on a DiT, so that its timestep range
    ``(1 - end_at) * (T - 1) .. (1 - start_at) * (T - 1)`` is the model's own timestep range:
    Flux's forward takes sigma in [0, 1] (the pipeline passes t / 1000), SD3's 1000 * sigma."""
    return 2 if family == "flux" else 1001


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
