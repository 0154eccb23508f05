"""Fused decoupled cross-attention: Triton kernels, a PyTorch reference and fallback, dispatch.

``decoupled_attention`` is the op; ``explain_dispatch`` says which backend it would run.
"""
from .dispatch import BACKENDS, Dispatch, explain_dispatch, use_backend
from .inputs import AttentionInputs, normalize_inputs, processor_inputs
from .op import decoupled_attention, run_inputs
from .reference import reference_decoupled_attention
from .tolerances import TOLERANCES, check_close

__all__ = [
    "BACKENDS",
    "Dispatch",
    "AttentionInputs",
    "decoupled_attention",
    "explain_dispatch",
    "use_backend",
    "normalize_inputs",
    "processor_inputs",
    "run_inputs",
    "reference_decoupled_attention",
    "TOLERANCES",
    "check_close",
]
