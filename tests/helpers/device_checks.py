"""GPU-only bug classes, caught on the CPU: run a model on the ``meta`` device (shapes
only) and watch every aten op for a CPU tensor.

On ``meta`` a host read of a device value (``float(t)``, ``t.item()``, ``if t > 0``)
raises, as it would sync the stream (and break CUDA graphs) on a GPU.  A tensor made
without a device (``torch.tensor``, ``torch.arange`` ...) and mixed in is recorded by
:class:`CpuOps`: on a GPU it is either a device error or a pageable copy per call.
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class CpuOps(TorchDispatchMode):
    """Records every aten op that touches a CPU tensor, with where it came from."""

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten((args, kwargs, out))[0]
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in flat):
            self.hits.append(f"{func}:\n" + "".join(traceback.format_stack(limit=8)[:-1]))
        return out


def to_meta(value):
    """Tensors (also inside dicts and lists) moved to ``meta``."""
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_meta(v) for v in value)
    return value
