"""Shared norm statistics (google/style-aligned ``sa_handler.register_shared_norm``).

Upstream replaces the ``forward`` of every ``nn.GroupNorm`` and ``nn.LayerNorm`` of the
UNet with::

    n = x.shape[-2]
    x = cat((x, expand_first(x)), dim=-2)   # append the reference rows on dim -2
    return orig_forward(x)[..., :n, :]

so each image's normalisation statistics cover its own features and those of the first
image of its CFG half (rows ``0`` and ``B//2``), and the output keeps only its own.
For a GroupNorm on ``(B, C, H, W)`` that concatenates along ``H``: the per-group mean
and (biased) variance are taken over own + reference.

LayerNorm is not patched here.  Upstream concatenates along dim -2, while a LayerNorm
normalises over its trailing ``normalized_shape``: for the per-channel LayerNorms of
a UNet (``normalized_shape`` = the last dim: the transformer blocks' norm1/2/3) the
statistics are per token, so appending tokens changes nothing (a mathematical no-op,
which the tests check against an upstream-style reference), and a LayerNorm spanning
dim -2 would reject the longer input.  ``share_layer_norm`` is kept as an option for
fidelity with upstream's signature; it patches nothing.

:func:`share_group_norms` patches the norms in place (a bound ``forward`` per layer, its
settings and the layer's previous ``forward`` kept on the layer itself, so a deep copy
of the UNet carries working patches); :func:`unshare_group_norms` puts back the very
``forward`` each layer had, so outputs return bit-identical.  The step gate, when it
can close, picks shared or plain output per call with ``torch.where`` on the gate
tensor: no Python branch on its value, so a compiled graph never recompiles.
"""
from __future__ import annotations

import types
from typing import Callable, List, Optional

import torch
from torch import nn

from .base import check_halves

_MARK = "_instantstyle_shared_norm"


def group_norms(unet) -> List[nn.GroupNorm]:
    """Every ``nn.GroupNorm`` of ``unet`` (``named_modules`` order)."""
    return [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]


def _share_axis(ndim: int) -> Optional[int]:
    """Axis along which the reference's features are appended: ``-2`` (``H``) as upstream
    for ``(B, C, H, W)`` and higher; the length axis of ``(B, C, L)``; none for ``(B, C)``."""
    if ndim >= 4:
        return -2
    if ndim == 3:
        return -1
    return None


def shared_forward(forward: Callable, x: torch.Tensor, halves: int, gate=None, name: str = "shared norm") -> torch.Tensor:
    """``forward`` (a GroupNorm's) with statistics over ``[x ; x's reference]``, keeping
    ``x``'s part; ``gate`` (0-D tensor or None) mixes in the plain ``forward(x)`` when 0."""
    axis = _share_axis(x.ndim)
    if axis is None:
        return forward(x)
    per_half = check_halves(name, x.shape[0], halves)
    rows = torch.arange(x.shape[0], device=x.device) // per_half * per_half  # reference_rows, made on x's device
    n = x.shape[axis]
    shared = forward(torch.cat((x, x[rows]), dim=axis)).narrow(axis, 0, n)
    if gate is None:
        return shared
    return torch.where(gate.to(x.device) > 0, shared, forward(x))


def _patched_forward(self, x):
    """The ``forward`` of a shared GroupNorm (bound to the layer)."""
    halves, gate, label = self._instantstyle_shared_norm_config
    had, previous = self._instantstyle_shared_norm_previous
    inner = previous if had else (lambda h: type(self).forward(self, h))
    value = None if gate is None or gate.always_open else gate.value
    return shared_forward(inner, x, halves, value, label)


def share_group_norms(unet, halves: int, gate=None, owner: str = "method", label: str = "shared norm") -> int:
    """Patch every GroupNorm of ``unet`` to share statistics with its CFG half's first row.

    ``gate``: a :class:`~instantstyle.processors.core.gating.StepGate` (read at every call) or
    None.  ``owner``: the method's name (what :func:`unshare_group_norms` undoes);
    ``label`` starts the error for a batch that does not split into ``halves``.
    Returns the number of layers patched.  Raises ValueError (patching nothing) if
    another method already shares them.
    """
    norms = group_norms(unet)
    for norm in norms:
        other = norm.__dict__.get(_MARK)
        if other is not None:
            raise ValueError(
                f"share_group_norm: the UNet's GroupNorm layers are already shared by method {other!r}; "
                "pass share_group_norm=False to one of the two"
            )
    for norm in norms:
        # an instance-level forward (an offload hook's, say) is kept and called inside ours
        norm.__dict__["_instantstyle_shared_norm_previous"] = ("forward" in norm.__dict__, norm.__dict__.get("forward"))
        norm.__dict__["_instantstyle_shared_norm_config"] = (halves, gate, label)
        norm.__dict__[_MARK] = owner
        norm.__dict__["forward"] = types.MethodType(_patched_forward, norm)
    return len(norms)


def unshare_group_norms(unet, owner: str) -> int:
    """Undo :func:`share_group_norms` of ``owner``: each layer gets back the exact
    ``forward`` it had.  Returns the number of layers restored."""
    restored = 0
    for norm in group_norms(unet):
        if norm.__dict__.get(_MARK) != owner:
            continue
        had, previous = norm.__dict__.pop("_instantstyle_shared_norm_previous")
        if had:
            norm.__dict__["forward"] = previous
        else:
            norm.__dict__.pop("forward", None)
        norm.__dict__.pop("_instantstyle_shared_norm_config", None)
        norm.__dict__.pop(_MARK, None)
        restored += 1
    return restored
