"""Projections called the cheap way: a bare ``nn.Linear`` as ``F.linear`` of its own
tensors (what every family's parse does six times per layer call), anything else
(LoRA layers, hooks, offloading) through its module."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module


def plain_linear(module) -> bool:
    """A bare ``nn.Linear``: no subclass (LoRA layers), no hooks, no replaced ``forward``
    (offloading), no global hooks.  Its output is ``F.linear`` of its own two tensors."""
    return (type(module) is torch.nn.Linear and not (module._forward_hooks or module._forward_pre_hooks
            or module._backward_hooks or module._backward_pre_hooks) and "forward" not in module.__dict__
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
                     or _module._global_backward_pre_hooks))


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a projection; a :func:`plain_linear` is called as ``F.linear``
    directly (``nn.Module.__call__`` costs ~2 us of Python, and a layer call makes six
    projections).  Anything else goes through the module as usual."""
    if plain_linear(module):
        params = module._parameters
        return F.linear(x, params["weight"], params["bias"])
    return module(x)


def weights(module) -> list:
    """The tensors a :func:`plain_linear`'s output depends on."""
    return [p for p in module._parameters.values() if p is not None]
