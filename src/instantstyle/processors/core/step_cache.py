"""Work that does not change from one denoising step to the next, done once per run.

A pipeline passes the SAME prompt and image-embedding tensors to the UNet at every step,
so the image projection and each layer's text and IP key/value projections give the same
result 30-50 times.  diffusers recomputes them every step (SDXL ``all``: 140 projections
plus the resampler per step); :class:`StepCache` remembers the last result and the exact
inputs it came from, and returns it while they are unchanged.

**A cache lives for one denoising run, never longer.**  Whether two calls belong to one
run is decided by the model's step hook (``model_state``), from the timestep alone: a
run is consecutive model calls whose timesteps strictly fall (see
``model_state.same_run``).  The same or a rising timestep, a call with no timestep, and
``clear_caches`` / ``reset_steps`` start a new run.  The hook makes the run *active*
while the model runs; a cache remembers which run filled it and is never read in
another, so a model call that is not part of a run (the first of a run included) starts
with empty caches.  Outside a model's forward (a layer called on its own) nothing is
active and nothing is cached, unless the caller declares a run with :func:`one_run`.
Models cache only after ``set_caches(model, True)`` (the loaders turn it on).

Inside a run, "unchanged" is checked exactly for every edit autograd sees: the cache
holds the input tensors themselves (so their identity can't be reused by new tensors),
their version counters (bumped by every in-place op, ``copy_``, ``load_state_dict``)
and data pointers, and the same for the weights; and the call's dtype, device and
autocast state (an autocast bf16 result is never served to an fp32 call, nor the
reverse).  ``module.to(...)``, ``.half()``, ``.cuda()`` swap a parameter's data without
bumping its version, so the modules that own caches (:class:`OwnsStepCaches`) empty
them whenever they are converted.

**The one edit no cheap check sees**: a write through ``.data`` (``w.data.mul_()``,
``w.data = ...``, peft's merge without ``safe_merge``) or through a numpy view
(``t.numpy()[:] = ...``) *inside* a run, e.g. in a ``callback_on_step_end``.  Call
``instantstyle.clear_caches(model)`` after such an edit (or edit with autograd-visible
ops: ``with torch.no_grad(): w.mul_(2)``).  Between runs every edit is seen.

It never caches

- while autograd records (training, or inputs that require grad);
- inference-mode tensors (they keep no version counter, so an in-place edit inside
  ``torch.inference_mode()`` could not be seen);
- inside ``torch.compile`` (a traced graph must not keep Python state);
- while a CUDA graph is being captured (the projections must be in the graph, so that
  replays with new embeddings written into the same tensors recompute them).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

# a C call that answers "is any autocast on" without parsing a device name (~0.1 us)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


class Run:
    """One denoising run: compared by identity only.  A copied or unpickled one is a new
    run (a copied model never reads caches filled for the original)."""

    __slots__ = ()

    def __deepcopy__(self, memo):
        return Run()

    def __reduce__(self):
        return (Run, ())


class _Active(threading.local):
    run = None  # the run the caches of this thread read and fill (None: no caching)
    pinned = None  # the run of the innermost one_run() block
    stack = None  # (owner id, previous run) per model forward being run


_active = _Active()


def active_run():
    return _active.run


def pinned_run():
    """The run of the innermost :func:`one_run` block, or None."""
    return _active.pinned


def enter(owner: int, run) -> None:
    """Make ``run`` active for the forward of the model ``owner`` (its step hook)."""
    if _active.stack is None:
        _active.stack = []
    _active.stack.append((owner, _active.run))
    _active.run = run


def leave(owner: int) -> None:
    """End :func:`enter` of ``owner`` (its post-forward hook; also when forward raised)."""
    stack = _active.stack
    if stack and stack[-1][0] == owner:
        _active.run = stack.pop()[1]


@contextmanager
def one_run() -> Iterator[Run]:
    """Treat every call inside the block as one denoising run: layers called on their own
    (benchmarks, custom loops) and models whose timesteps don't fall reuse caches across
    calls.  A model with ``set_caches(model, False)`` still caches nothing.  The same
    rule as in a run holds: an edit through ``.data`` or a numpy view inside the block
    needs ``clear_caches(model)``."""
    run = Run()
    saved = (_active.run, _active.pinned)
    _active.run = _active.pinned = run
    try:
        yield run
    finally:
        _active.run, _active.pinned = saved


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


def _autocast_dtype(device_type: str):
    """The autocast dtype on ``device_type``, None where autocast is off there."""
    if _any_autocast is not None and not _any_autocast():
        return None
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:  # a device type autocast doesn't know (meta): it can't be on there
        return None


class StepCache:
    """One remembered result of ``fn(*tensors)``, valid within the run that filled it."""

    __slots__ = ("run", "device", "dtype", "autocast", "cuda", "tensors", "stamps", "value")

    def __init__(self):
        self.clear()

    def get(self, tensors: Sequence[torch.Tensor], fn: Callable[[], object]):
        """``fn()``, or its remembered result when this is the run that filled the cache,
        with the same device and autocast state, and ``tensors`` are the same, unmodified
        tensors."""
        if torch.compiler.is_compiling():  # first: nothing else may be traced
            return fn()
        run = _active.run
        if run is None:
            return fn()
        if self.run is run and len(tensors) == len(self.tensors):
            # the hit path, in one pass: the stored tensors passed ``cacheable`` when
            # stored; what can change since is the grad mode, a capture and autocast.  The
            # input's device and dtype stand for the call's (fn() raised unless the weights
            # were on its device); another dtype or device for a weight means new storage.
            grad = torch.is_grad_enabled()
            for t, cached, (version, pointer) in zip(tensors, self.tensors, self.stamps):
                if t is not cached or t._version != version or t.data_ptr() != pointer or (grad and t.requires_grad):
                    break
            else:
                first = tensors[0]
                autocast = _autocast_dtype(self.device.type) if _any_autocast is None or _any_autocast() else None
                if autocast is self.autocast and first.dtype == self.dtype and first.device == self.device \
                        and not (self.cuda and torch.cuda.is_current_stream_capturing()):
                    return self.value
        if not cacheable(tensors):
            return fn()
        value = fn()
        first = tensors[0]
        self.run, self.value, self.device, self.dtype = run, value, first.device, first.dtype
        self.autocast = _autocast_dtype(first.device.type)
        self.cuda = any(t.is_cuda for t in tensors)
        self.tensors = tuple(tensors)
        self.stamps = tuple((t._version, t.data_ptr()) for t in tensors)
        return value

    def clear(self) -> None:
        self.run = self.device = self.dtype = self.autocast = self.value = None
        self.cuda = False
        self.tensors, self.stamps = (), ()

    # Copies start empty: a copied model's tensors are new objects anyway.
    def __deepcopy__(self, memo):
        return StepCache()

    def __reduce__(self):
        return (StepCache, ())


def clear_owned(obj) -> None:
    """Empty every :class:`StepCache` held by ``obj`` (as an attribute or in a list)."""
    for value in list(vars(obj).values()) if hasattr(obj, "__dict__") else ():
        for cache in value if isinstance(value, list) else (value,):
            if isinstance(cache, StepCache):
                cache.clear()


class OwnsStepCaches:
    """Mixin for an ``nn.Module`` holding :class:`StepCache` attributes (or lists of them):
    every conversion (``to``, ``half``, ``cuda``, ...) empties them first."""

    def _apply(self, fn, *args, **kwargs):
        clear_owned(self)
        return super()._apply(fn, *args, **kwargs)
