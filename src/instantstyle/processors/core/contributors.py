"""The contributor protocol: what anything attached to an attention layer may add to
its one op call.  IP-Adapter (its streams), StyleAligned, Visual Style Prompting and
attention-map capture are all contributors; the per-layer pipeline (``pipeline``)
calls their hooks in this order:

====  ===================  ================================================================
kind  hook                 contribution
====  ===================  ================================================================
4     ``transform_qk``     new queries/keys before attention (AdaIN toward a reference)
3     ``replace_kv``       new keys/values (Visual Style Prompting, MasaCtrl)
2     ``joint_kv``         extra keys/values in the SAME softmax, optional logit bias
                           (StyleAligned, SD3-style IP)
1     ``streams``          extra keys/values with their own softmax and scale
                           (IP-Adapter, InstantID, FaceID)
5     ``observe``          the materialised attention probabilities (visualisation);
                           the layer takes the unfused path only while it is active
====  ===================  ================================================================

A hook sees an :class:`AttentionCall`: the layer's tensors as they are at that point,
so a later kind sees what earlier kinds made of them.  Hooks return tensors and never
handle step gating: outside the contributor's ``gate`` the pipeline keeps the original
tensors, masks joint keys out and zeroes stream scales, with tensor ops (a compiled
graph does not recompile when a contributor switches on or off).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch


class Kind(enum.IntEnum):
    """Contribution kinds; the numbers are the documented ones above (and compare equal to them)."""

    STREAMS = 1
    JOINT_KV = 2
    REPLACE_KV = 3
    TRANSFORM_QK = 4
    OBSERVE = 5


HOOKS = {"transform_qk": Kind.TRANSFORM_QK, "replace_kv": Kind.REPLACE_KV, "joint_kv": Kind.JOINT_KV,
         "streams": Kind.STREAMS, "observe": Kind.OBSERVE}


@dataclass
class AttentionCall:
    """One attention layer's inputs at one step, in the op's ``(B, L, H, D)`` layout."""

    site: str  # attn_processors key of the layer ("" when the processor is used bare)
    weight: object  # the current contributor's target weight here (1.0 for presets and patterns)
    q: torch.Tensor  # (B, N, H, D)
    k: torch.Tensor  # (B, Lt, H, D): text keys in cross-attention, own tokens in self-attention
    v: torch.Tensor
    text_bias: Optional[torch.Tensor]  # (B, Lt) key-padding mask or None
    ip_states: list = field(default_factory=list)  # per IP-Adapter, as diffusers passes them
    ip_adapter_masks: object = None  # the pipeline's ``ip_adapter_masks`` argument
    step: int = 0  # UNet calls since this run started (see ``model_state``)
    timestep: Optional[torch.Tensor] = None  # the UNet's timestep argument, on its device
    sample_size: Optional[tuple] = None  # (h, w) of the UNet's latent input

    @classmethod
    def at(cls, site: str, state, q, k, v, text_bias=None, **fields) -> "AttentionCall":
        """A call at ``site`` with the step, timestep and latent size of the model's
        ``state`` (``model_state.ModelState``, or None for a bare processor)."""
        if state is not None:
            fields.setdefault("step", max(state.step, 0))
            fields.setdefault("timestep", state.timestep)
            fields.setdefault("sample_size", state.sample_size)
        return cls(site=site, weight=fields.pop("weight", 1.0), q=q, k=k, v=v, text_bias=text_bias, **fields)

    def view(self, **changes) -> "AttentionCall":
        """The same call with some fields replaced (a part of the sequence, another weight)."""
        return dataclasses.replace(self, **changes)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def spatial(self) -> Optional[tuple]:
        """``(h, w)`` of this layer's queries, from the latent size (None if unknown)."""
        if self.sample_size is None:
            return None
        h, w = self.sample_size
        n = self.q.shape[1]
        factor = round((h * w / n) ** 0.5)
        if factor < 1 or (h // factor) * (w // factor) != n:
            return None
        return h // factor, w // factor


@functools.lru_cache(maxsize=None)
def kinds_of(cls) -> Tuple[Kind, ...]:
    """A class' contribution kinds, found once per class (read at every layer call)."""
    return tuple(sorted(k for hook, k in HOOKS.items() if getattr(cls, hook) is not getattr(Contributor, hook)))


class Contributor:
    """Base class: override the hooks you need.  ``gate`` is a
    :class:`~instantstyle.processors.core.gating.StepGate` or None (always on, or a
    contributor that gates itself, as IP-Adapter does per adapter)."""

    name = "contributor"
    gate = None
    #: True only for contributions built by instantstyle itself from the layer's own
    #: projections (IP-Adapter's streams): they skip the op's argument checks.
    trusted = False

    @property
    def kinds(self) -> list:
        """The contribution kinds (1-5) implemented, from the overridden hooks."""
        return list(kinds_of(type(self)))

    def transform_qk(self, call: AttentionCall):
        """Kind 4: return ``(q, k)`` to use instead of ``call.q``, ``call.k``."""
        return call.q, call.k

    def replace_kv(self, call: AttentionCall):
        """Kind 3: return ``(k, v)`` to use instead of ``call.k``, ``call.v``."""
        return call.k, call.v

    def joint_kv(self, call: AttentionCall):
        """Kind 2: return ``(k, v, bias)``: ``(B, Lj, H, D)`` keys/values joining the first
        softmax, ``bias`` None or a ``(B, Lj)`` additive logit bias; or None for nothing."""
        return None

    def streams(self, call: AttentionCall):
        """Kind 1: return a list of ``(k, v, scale)`` or ``(k, v, scale, mask)``: each its own
        softmax, weighted by ``scale`` (number or 0-D/``(B,)`` tensor) and ``mask`` ``(B, N)``."""
        return []

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:
        """Kind 5: ``probs`` ``(B, H, N, Lt + Lj)`` of the first softmax (text or own keys first)."""

    def observing(self, call: AttentionCall) -> bool:
        """Whether ``observe`` wants this call (checked only while the gate is open).
        Return False wherever maps are not needed: those calls stay fused."""
        return True

    def on_step(self, step: int, timestep) -> None:
        """Called before every UNet forward while attached."""

    def on_detach(self, model) -> None:
        """Called once the contributor is off every layer: undo anything done beyond
        attention (StyleAligned's shared GroupNorms)."""


@dataclass
class Attached:
    """One contributor at one layer, as the layer's ``Attention`` module holds it."""

    contributor: Contributor
    site: str
    weight: object
    restore: object = None  # the stateless diffusers processor the layer had before, if any
    state: object = None  # the model's ``ModelState`` (step, timestep, latent size)
