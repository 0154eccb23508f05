"""Editing methods on Flux/SD3 layers: which methods joint attention supports (the
fused processor a layer needs is ``conversion.dit_equivalent``) (see ``joint_observe`` for what "cross"/"self" mean
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

from ..core.contributors import Kind, kinds_of


def check_dit_method(method) -> None:
    kinds = set(kinds_of(type(method)))
    if Kind.STREAMS in kinds:
        raise ValueError(
            f"method: {method.name} adds attention streams (contribution kinds {sorted(map(int, kinds))}); on Flux/SD3 joint attention "
            "only kinds 2-5 (transform_qk, replace_kv, joint_kv, observe) are supported"
        )


def dit_gate_steps(family: str) -> int:
    """``num_train_timesteps`` for a method's StepGate on a DiT, so that its timestep range
    ``(1 - end_at) * (T - 1) .. (1 - start_at) * (T - 1)`` is the model's own timestep range:
    Flux's forward takes sigma in [0, 1] (the pipeline passes t / 1000), SD3's 1000 * sigma."""
    return 2 if family == "flux" else 1001
