"""Per-block control of the Wan family's native image branch (diffusers offers none).

    set_image_scale(pipe, 0.5)                                # every block
    set_image_scale(pipe, [1.0] * 20 + [0.0] * 20)            # one scale per block
    set_image_scale(pipe, {0: 0.0, 39: 2.0})                  # by block index, others 1
    set_image_scale(pipe, 0.0, target="blocks.3")             # a pattern (or a preset)
    set_image_scale(pipe, 0.8, start_at=0.0, end_at=0.5)      # gated: first half of the schedule

Each call describes the whole model: blocks it does not name get scale 1 and no gate
(diffusers' math).  A block at scale 0 does no image-branch work at all (no
``add_k_proj``/``add_v_proj``, no second softmax).  The image branch is linear in its
values, so scale ``s`` equals diffusers with that block's ``add_v_proj`` (weight and
bias) multiplied by ``s``.

``start_at``/``end_at`` gate the named blocks like IP-Adapter gates: fractions of the
schedule (0 = the first, noisiest step), read from the transformer's ``timestep``
argument on the device (a :class:`StepGate`, updated in place by the model's step hook);
outside the range the branch contributes 0.  Wan's pipelines pass ``t`` in [0, 1000].
"""
from __future__ import annotations

import math
import numbers

from ..core.gating import StepGate
from ..core.model_state import ensure_step_hook
from ..core.models import unet_of
from ..core.validation import describe
from ..targets.registry import registry_of
from .conversion import fused_sites, image_branch_sites, install

#: the StepGate's ``num_train_timesteps``: Wan's forward takes t = 1000 * sigma, so
#: ``(T - 1) = 1000`` makes the gate's timestep range the model's own
WAN_GATE_STEPS = 1001


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def _block_index(site: str) -> int:
    return int(site.split(".")[1])  # blocks.N.attn2.processor


def resolve_scales(model, sites, scale, target=None) -> tuple:
    """``({site: scale}, {sites the call names})`` over the image-branch ``sites``."""
    by_block = {_block_index(s): s for s in sites}
    n = len(sites)
    if isinstance(scale, (list, tuple, dict)) and target is not None:
        raise ValueError(f"target: a per-block scale {type(scale).__name__} names its blocks itself; pass target=None "
                         f"or a single number, got target={target!r}")
    if isinstance(scale, (list, tuple)):
        if len(scale) != n:
            raise ValueError(f"scale: expected {n} numbers (one per block with an image branch), got {len(scale)}")
        named = {by_block[i]: _number(f"scale[{j}]", v) for j, (i, v) in enumerate(zip(sorted(by_block), scale))}
    elif isinstance(scale, dict):
        bad = [k for k in scale if isinstance(k, bool) or not isinstance(k, int) or k not in by_block]
        if bad:
            raise ValueError(f"scale: expected block indices in [0, {n}) as dict keys, got {bad}")
        named = {by_block[i]: _number(f"scale[{i}]", v) for i, v in scale.items()}
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        value = _number("scale", scale)
        if target is None:
            named = {s: value for s in sites}
        else:
            weights = registry_of(model).resolve(target, "cross")
            named = {s: value * float(w) for s, w in weights.items() if s in sites}
            if not named:
                raise ValueError(f"target: {target!r} matches no cross-attention layer with an image branch "
                                 f"(blocks.N.attn2, N in [0, {n}))")
    else:
        raise TypeError(f"scale: expected a number, a list of {n} numbers (one per block) or {{block index: number}}, "
                        f"got {describe(scale)}")
    return {s: named.get(s, 1.0) for s in sites}, set(named)


def set_image_scale(pipe_or_model, scale, target=None, start_at: float = 0.0, end_at: float = 1.0) -> dict[str, float]:
    """Scale (and gate) the native image branch of a Wan-family I2V/FLF2V transformer per
    block; installs the fused processors where diffusers' are.  Returns ``{site: scale}``
    of every image-branch layer.  See the module doc."""
    model = unet_of(pipe_or_model)
    sites = [s for s, _ in image_branch_sites(model)]
    if not sites:
        raise ValueError(f"pipe_or_model: expected a Wan-family I2V/FLF2V transformer (cross-attention with an image "
                         f"branch, add_k_proj), got a {type(model).__name__} without one")
    gate = StepGate(start_at, end_at, WAN_GATE_STEPS)  # checks start_at/end_at first
    scales, named = resolve_scales(model, sites, scale, target)
    procs = fused_sites(model)  # every check before anything changes
    for site, proc in procs.items():
        proc.image_scale = scales[site]
        proc.image_gate = gate if site in named and not gate.always_open else None
    install(model, procs)
    if not gate.always_open:
        ensure_step_hook(model)
    return scales


def image_scales(pipe_or_model) -> dict[str, tuple]:
    """``{site: (scale, gate or None)}`` as the layers hold them (1.0 and None for diffusers' processors)."""
    model = unet_of(pipe_or_model)
    return {site: (getattr(m.processor, "image_scale", 1.0), getattr(m.processor, "image_gate", None))
            for site, m in image_branch_sites(model)}
