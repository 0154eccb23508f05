"""The extension interface: what an attention-editing method declares.

A method is a :class:`~instantstyle.processors.core.contributors.Contributor` (its hooks,
kinds 1-5, are documented there) that also says

- **where** it applies: ``kind`` (``"self"``, ``"cross"`` or ``"any"`` attention) and a
  ``target`` resolved by the same registry as IP-Adapter's (presets, module-path
  patterns, ``set_ip_adapter_scale``-style dicts);
- **when**: ``start_at`` / ``end_at``, fractions of the denoising schedule (a
  :class:`~instantstyle.processors.core.gating.StepGate`, as for IP-Adapter);
- optionally, what it changes beyond attention (``patch_modules`` /
  ``unpatch_modules``: StyleAligned's shared GroupNorm statistics).

In-batch references are the method's business; :func:`reference_rows` gives each row
the first row of its CFG half.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..core.contributors import HOOKS, AttentionCall, Contributor
from ..core.gating import StepGate
from ..core.validation import describe

__all__ = ["HOOKS", "AttentionCall", "EditingMethod", "check_halves", "reference_rows"]


class EditingMethod(Contributor):
    """Base class of attention-editing methods; override the hooks you need.

    Args:
        target: where to apply, see :mod:`instantstyle.processors.targets.registry`; None uses
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
    def select_sites(self, sites: Sequence[str]) -> Sequence[str]:
        """Narrow the resolved sites (in ``attn_processors`` order); all by default."""
        return sites

    # -- beyond attention ---------------------------------------------------------------
    def patch_modules(self, unet) -> None:
        """Called by ``apply_method`` before the method's layers are set: patch other
        modules of ``unet`` (StyleAligned's shared GroupNorm statistics).  Raise, changing
        nothing, to refuse; the method is then not applied."""

    def unpatch_modules(self, unet) -> None:
        """Called by ``remove_method``: undo ``patch_modules`` exactly (whatever the
        method's options are by then)."""

    def on_detach(self, model) -> None:
        self.unpatch_modules(model)

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


def reference_rows(batch: int, halves: int, name: str = "cfg", device=None) -> torch.Tensor:
    """Index of each row's reference: the first row of its CFG half (``0`` and ``B//2``),
    made on ``device`` (pass the layer's: a CPU index copied to a GPU per call would be a
    host sync, and breaks CUDA-graph capture)."""
    per_half = check_halves(name, batch, halves)
    return torch.arange(batch, device=device) // per_half * per_half
