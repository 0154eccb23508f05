"""Work that does not change from one denoising step to the next, done once per run.

A pipeline passes the SAME image-embedding tensors to the UNet at every step, so the
image projection and each layer's IP key/value projections give the same result 30-50
times.  diffusers recomputes them every step (SDXL ``all``: 140 projections plus the
resampler per step); :class:`StepCache` remembers the last result and the exact inputs
it came from, and returns it while they are unchanged.

"Unchanged" is checked exactly: the cache holds the input tensors themselves (so their
identity can't be reused by new tensors) and their version counters (bumped by every
in-place write), and the same for the weights.  It never caches

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

    __slots__ = ("tensors", "versions", "value")

    def __init__(self):
        self.tensors, self.versions, self.value = (), (), None

    def get(self, tensors: Sequence[torch.Tensor], fn: Callable[[], object]):
        """``fn()``, or its remembered result when ``tensors`` are the same, unmodified tensors."""
        if not cacheable(tensors):
            return fn()
        if len(tensors) == len(self.tensors) and all(a is b for a, b in zip(tensors, self.tensors)) \
                and all(t._version == v for t, v in zip(tensors, self.versions)):
            return self.value
        self.value = fn()
        self.tensors, self.versions = tuple(tensors), tuple(t._version for t in tensors)
        return self.value

    def clear(self) -> None:
        self.tensors, self.versions, self.value = (), (), None

    # Copies start empty: a copied model's tensors are new objects anyway.
    def __deepcopy__(self, memo):
        return StepCache()

    def __reduce__(self):
        return (StepCache, ())
