"""The extension interface: what an attention-editing method declares.

A method is a small class.  It says

- **where** it applies: ``kind`` (``"self"``, ``"cross"`` or ``"any"`` attention) and a
  ``target`` resolved by the same registry as IP-Adapter's (presets, module-path
  patterns, ``set_ip_adapter_scale``-style dicts);
- **when**: ``start_at`` / ``end_at``, fractions of the denoising schedule (a
  :class:`~instantstyle.processors.gating.StepGate`, as for IP-Adapter);
- **what it contributes**, by overriding one or more hooks.  The dispatch
  (``compose``) calls them in this order at every layer the method is attached to:

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

Kinds 1-4 of every method at a layer end in ONE ``decoupled_attention`` call.
A hook sees an :class:`AttentionCall`: the layer's tensors as they are at that point,
so a later kind sees what earlier kinds made of them (StyleAligned's joint keys are
its AdaIN'd keys).  Hooks return tensors and never handle step gating: outside
``[start_at, end_at]`` the dispatch keeps the original tensors, masks the joint keys
out and zeroes the streams' scales, with tensor ops (no recompiles).  In-batch
references are the method's business; :func:`reference_rows` gives each row the first
row of its CFG half.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from ..gating import StepGate
from ..validation import describe

HOOKS = {"transform_qk": 4, "replace_kv": 3, "joint_kv": 2, "streams": 1, "observe": 5}


@dataclass
class AttentionCall:
    """One attention layer's inputs at one step, in the op's ``(B, L, H, D)`` layout."""

    site: str  # attn_processors key of the layer
    weight: object  # the current method's target weight here (1.0 for presets and patterns)
    q: torch.Tensor  # (B, N, H, D)
    k: torch.Tensor  # (B, Lt, H, D): text keys in cross-attention, own tokens in self-attention
    v: torch.Tensor
    text_bias: Optional[torch.Tensor]  # (B, Lt) key-padding bias or None
    streams: list = field(default_factory=list)  # (k, v, scale, mask): one softmax each
    step: int = 0  # UNet calls since the methods were attached (or since ``reset_steps``)
    timestep: Optional[float] = None
    sample_size: Optional[tuple] = None  # (h, w) of the UNet's latent input

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


class EditingMethod:
    """Base class of attention-editing methods; override the hooks you need.

    Args:
        target: where to apply, see :mod:`instantstyle.processors.registry`; None uses
            the class' ``default_target``.
        start_at, end_at: active range over the denoising schedule (0 = first step).
        name: key of the method in the registry and in :func:`apply_method`;
            defaults to the class' ``name``.
    """

    name = "method"
    kind = "self"  # which attention layers: "self", "cross" or "any"
    default_target = "all"

    def __init__(self, target=None, *, start_at: float = 0.0, end_at: float = 1.0, name: Optional[str] = None):
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name: expected a non-empty string, got {describe(name)}")
        self.name = name or type(self).name
        self.target = self.default_target if target is None else target
        self.gate = StepGate(start_at, end_at)

    # -- declaration ------------------------------------------------------------------
    @property
    def kinds(self) -> List[int]:
        """The contribution kinds (1-5) this method implements, from its overridden hooks."""
        return sorted(k for hook, k in HOOKS.items() if getattr(type(self), hook) is not getattr(EditingMethod, hook))

    def select_sites(self, sites: Sequence[str]) -> Sequence[str]:
        """Narrow the resolved sites (in ``attn_processors`` order); all by default."""
        return sites

    # -- hooks (the defaults contribute nothing) ---------------------------------------
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
        softmax, weighted by ``scale`` (number or ``(B,)`` tensor) and ``mask`` ``(B, N)``."""
        return []

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:
        """Kind 5: ``probs`` ``(B, H, N, Lt + Lj)`` of the first softmax (text or own keys first)."""

    def observing(self, call: AttentionCall) -> bool:
        """Whether ``observe`` wants this call (checked only while the step gate is open).
        Return False wherever maps are not needed: those calls stay fused."""
        return True

    # -- beyond attention ---------------------------------------------------------------
    def patch_modules(self, unet) -> None:
        """Called by ``apply_method`` before the method's layers are set: patch other
        modules of ``unet`` (StyleAligned's shared GroupNorm statistics).  Raise, changing
        nothing, to refuse; the method is then not applied."""

    def unpatch_modules(self, unet) -> None:
        """Called by ``remove_method``: undo ``patch_modules`` exactly (whatever the
        method's options are by then)."""

    # -- step bookkeeping ---------------------------------------------------------------
    def on_step(self, step: int, timestep) -> None:
        """Called before every UNet forward while the method is attached."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, target={self.target!r}, {self.gate})"


def check_halves(name: str, batch: int, halves: int) -> int:
    """Rows per CFG half; the batch must split evenly."""
    if batch % halves:
        raise ValueError(
            f"{name}: expected a batch divisible by {halves} (CFG halves), got batch {batch}; "
            "pass cfg=False for a batch without classifier-free guidance"
        )
    return batch // halves


def reference_rows(batch: int, halves: int, name: str = "cfg") -> torch.Tensor:
    """Index of each row's reference: the first row of its CFG half (``0`` and ``B//2``)."""
    per_half = check_halves(name, batch, halves)
    return torch.arange(batch) // per_half * per_half
