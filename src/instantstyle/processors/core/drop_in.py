"""What makes a fused processor a drop-in for diffusers' own, for every family and for
every subclass a user writes (``class Mine(FusedIPAdapterAttnProcessor): ...``).

- **A precomputed call signature.**  diffusers' ``Attention.forward`` (and Flux's and
  SD3's) runs ``inspect.signature(processor.__call__)`` on every call to drop unknown
  keyword arguments; for a bound method that builds two Signature objects, ~20 us of
  Python per layer call.  Every instance gets a :class:`SignedCall` in its ``__dict__``
  when it is created (``__new__``, so no constructor has to remember it), which attribute
  lookup finds before the class's method, and which answers ``inspect.signature`` at once.  ``processor(...)`` itself
  never goes through it (Python looks ``__call__`` up on the type).
- **Exact-class checks.**  ``set_default_attn_processor`` accepts only processors whose
  class is *exactly* in ``CROSS_ATTENTION_PROCESSORS``; every subclass of a class that
  counts as one is registered there when it is defined (``diffusers_compat``).

Both happen in ``__init_subclass__``, so a subclass needs nothing of its own, and a
subclass that overrides ``__call__`` gets its own signature.
"""
from __future__ import annotations

import inspect

from . import diffusers_compat


def _bound_signature(cls) -> inspect.Signature:
    signature = inspect.signature(cls.__call__)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


class SignedCall:
    """``processor.__call__`` on our processors: the bound call, with its signature precomputed."""

    __slots__ = ("processor", "__signature__")

    def __init__(self, processor):
        self.processor = processor
        self.__signature__ = type(processor).bound_call_signature

    def __call__(self, *args, **kwargs):
        return type(self.processor).__call__(self.processor, *args, **kwargs)

    def __reduce__(self):  # pickled as a reference to its processor, never as a Signature
        return SignedCall, (self.processor,)


class DropInProcessor:
    """Base of every fused processor class (UNet, Flux, SD3) and of their subclasses."""

    #: marks processors that run the per-layer engine (``model_state.runs_pipeline``)
    instantstyle_pipeline = True
    #: set where diffusers' own counterpart is in ``CROSS_ATTENTION_PROCESSORS``
    counts_as_cross_attention = False
    bound_call_signature: inspect.Signature

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.bound_call_signature = _bound_signature(cls)
        if cls.counts_as_cross_attention:
            diffusers_compat.register_processor_classes(cls)

    def __new__(cls, *args, **kwargs):
        # before any __init__ (ours, diffusers', a user's), and for copies and unpickling too
        # (they create with __new__, then restore __dict__, whose SignedCall points at the copy);
        # __dict__ directly: nn.Module.__setattr__ is slow and not ready yet
        self = super().__new__(cls)
        self.__dict__["__call__"] = SignedCall(self)
        return self
