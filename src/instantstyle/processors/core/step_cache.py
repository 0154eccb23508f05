"""Work that does not change from one denoising step to the next, done once per run.

A pipeline passes the SAME image-embedding tensors to the UNet at every step, so the
image projection and each layer's IP key/value projections give the same result 30-50
times.  diffusers recomputes them every step (SDXL ``all``: 140 projections plus the
resampler per step); :class:`StepCache` remembers the last result and the exact inputs
it came from, and returns it while they are unchanged.

"Unchanged" is checked exactly: the cache holds the input tensors themselves (so their
identity can't be reused by new tensors), their version counters (bumped by every
in-place write) and data pointers, and the same for the weights.  ``module.to(...)``,
``.half()``, ``.cuda()`` swap a parameter's data without bumping its version, so the
modules that own caches (:class:`OwnsStepCaches`) empty them whenever they are converted.
It never caches

- while autograd records (training, or inputs that require grad);
- inference-mode tensors (they keep no version counter, so an in-place edit inside
  ``torch.inference_mode()`` could not be seen);
- inside ``torch.compile`` (a traced graph must not keep Python state);
- while a CUDA graph is being captured (the projections must be in the graph, so that
  replays with new embeddings written into the same tensors recompute them).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def cacheable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a result computed from ``tensors`` may be remembered (see the module doc)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    on_cuda = False
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.is_inference() or (grad and t.requires_grad):
            return False
        on_cuda = on_cuda or t.is_cuda
    return not (on_cuda and torch.cuda.is_current_stream_capturing())


class StepCache:
    """One remembered result of ``fn(*tensors)``."""

    __slots__ = ("tensors", "stamps", "value")

    def __init__(self):
        self.clear()

    def get(self, tensors: Sequence[torch.Tensor], fn: Callable[[], object]):
        """``fn()``, or its remembered result when ``tensors`` are the same, unmodified tensors."""
        if not cacheable(tensors):
            return fn()
        if len(tensors) == len(self.tensors):
            for t, cached, (version, pointer) in zip(tensors, self.tensors, self.stamps):
                if t is not cached or t._version != version or t.data_ptr() != pointer:
                    break
            else:
                return self.value
        self.value = fn()
        self.tensors, self.stamps = tuple(tensors), tuple((t._version, t.data_ptr()) for t in tensors)
        return self.value

    def clear(self) -> None:
        self.tensors, self.stamps, self.value = (), (), None

    # Copies start empty: a copied model's tensors are new objects anyway.
    def __deepcopy__(self, memo):
        return StepCache()

    def __reduce__(self):
        return (StepCache, ())


class OwnsStepCaches:
    """Mixin for an ``nn.Module`` holding :class:`StepCache` attributes (or lists of them):
    every conversion (``to``, ``half``, ``cuda``, ...) empties them first."""

    def _apply(self, fn, *args, **kwargs):
        for value in self.__dict__.values():
            for cache in value if isinstance(value, list) else (value,):
                if isinstance(cache, StepCache):
                    cache.clear()
        return super()._apply(fn, *args, **kwargs)
