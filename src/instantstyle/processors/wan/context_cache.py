"""Per-run reuse of a Wan cross-attention layer's text and image K/V inside the model's
forward.

diffusers' Wan forward builds the cross-attention context anew on every call
(``text_embedder``, ``image_embedder``, ``torch.concat``), so the tensor every layer
gets is a new object at every step, and under CFG the pipeline makes two calls per step
(cond, uncond) with two contexts.  An identity-keyed cache (the UNet path's) would never
hit.  So, per denoising run (``step_cache``'s active run):

- the first layer that sees a context object compares it, **bit for bit** (integer
  views: ``-0.0`` differs from ``0.0``, a NaN equals the same NaN), with the contexts
  already seen in the run; a match maps it to that earlier tensor, the *canonical*
  context.  Every later layer of the same call finds the object by identity (and
  unchanged version and data pointer), so there is one comparison per distinct context
  object per call, not per layer.  (On a GPU the comparison's answer is read on the
  host: one sync per model call and context.)
- each layer keeps one :class:`StepCache` per canonical context (up to ``SLOTS``; more
  distinct contexts in one run are computed, not cached), keyed as before on the
  canonical tensor and every weight the K/V depend on, with the step cache's exact
  checks (same tensors, versions, data pointers, dtype, device, autocast).

A bit-identical context gives bit-identical K/V, so a hit returns exactly what the
layer would compute.  Nothing is cached outside a run, or with ``set_caches(model,
False)`` (no active run then).
"""
from __future__ import annotations

import threading

import torch

from ..core.step_cache import StepCache, active_run, cacheable

#: distinct contexts cached per run and layer (CFG: cond and uncond; FLF2V and others: more)
SLOTS = 4
_CACHES = "_instantstyle_wan_kv"  # on the Attention module: SLOTS text caches, then SLOTS image caches
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def layer_caches(attn) -> list:
    """The layer's ``2 * SLOTS`` caches (``model_state.clear_caches`` empties them)."""
    caches = attn.__dict__.get(_CACHES)
    if caches is None or len(caches) != 2 * SLOTS:
        caches = attn.__dict__[_CACHES] = [StepCache() for _ in range(2 * SLOTS)]
    return caches


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    view = _INT_VIEW.get(a.element_size())
    if view is None or a.is_complex():
        return False
    return torch.equal(a.view(view), b.view(view))


class _Memo(threading.local):
    run = None
    canonical = ()  # the run's distinct contexts, in the order first seen
    seen = ()  # (context, version, data pointer, slot) of the latest context objects


_memo = _Memo()


def canonical_context(context: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """``(key tensor, slot)``: the run's canonical tensor bit-equal to ``context`` and its
    cache slot, or ``(context, None)`` where nothing may be cached."""
    run = active_run()
    if run is None or torch.compiler.is_compiling():
        return context, None
    if _memo.run is not run:  # a new run: nothing of the last one is reused
        _memo.run, _memo.canonical, _memo.seen = run, (), ()
    version, pointer = context._version, context.data_ptr()
    for obj, v, p, slot in _memo.seen:
        if obj is context and v == version and p == pointer:
            return _memo.canonical[slot], slot
    if not cacheable((context,)):
        return context, None
    slot = next((i for i, c in enumerate(_memo.canonical) if same_bits(c, context)), None)
    if slot is None:
        if len(_memo.canonical) >= SLOTS:
            return context, None
        _memo.canonical += (context,)
        slot = len(_memo.canonical) - 1
    # the object itself is held, so its id can't be reused while it is remembered
    _memo.seen = ((context, version, pointer, slot), *_memo.seen[: 2 * SLOTS - 1])
    return _memo.canonical[slot], slot


def caches_for(attn, context: torch.Tensor):
    """``(key tensor, text cache, image cache)`` for one layer call (caches None: compute)."""
    key, slot = canonical_context(context)
    if slot is None:
        return context, None, None
    caches = layer_caches(attn)
    return key, caches[slot], caches[SLOTS + slot]
