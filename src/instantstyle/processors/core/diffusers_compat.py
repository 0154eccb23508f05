"""The three places where diffusers' model APIs can't see our processors as drop-in,
and the explicit, tested patches that make them.  Everything else (``set_attn_processor``,
``unload_ip_adapter``, ``set_ip_adapter_scale``, ``fuse/unfuse_qkv_projections``,
save/load, deepcopy) works by design: our IP processor subclasses diffusers' and keeps
its attributes, the plain one is constructible without arguments, and what is
attached to a layer lives on its module (see ``model_state``).

1. ``set_default_attn_processor`` accepts a model only if every processor's class is
   *exactly* one of ``CROSS_ATTENTION_PROCESSORS`` (``proc.__class__ in (...)``, not
   ``isinstance``).  :func:`register_processor_classes` adds our classes to that tuple in
   every loaded diffusers module that imported it (a tuple is copied by ``from ...
   import``, so each binding is rebound); it runs again whenever processors are
   installed, for modules imported since.  The default processor then replaces ours,
   as it replaces diffusers' own IP processors.
2. ``Attention.set_use_memory_efficient_attention_xformers`` (behind
   ``enable/disable_xformers_memory_efficient_attention``) rebuilds an IP processor as
   diffusers' class from its ``state_dict``, which fails for a layer that holds only
   some adapters' weights and would drop step gates.  Patched: a layer running our
   processor keeps it (the fused op is already memory-efficient), with its targets,
   scales and gates; enabling still raises diffusers' own errors when xformers or CUDA
   is missing.  Other layers switch as usual.
3. ``UNetMotionModel.from_unet2d`` rebuilds IP processors as diffusers' class and then
   loads their weights strictly.  Patched: the conversion runs on diffusers' plain
   processors, and the motion model then gets copies of ours (same weights, targets,
   scales and gates) at the same layers.  Methods attached to layers are not carried
   over (apply them to the motion model).
"""
from __future__ import annotations

import copy
import functools
import sys

_OURS: tuple = ()


def _ours(processor) -> bool:
    return getattr(type(processor), "instantstyle_pipeline", False)


def register_processor_classes(*classes) -> None:
    """Make ``classes`` count as cross-attention processors for ``set_default_attn_processor``."""
    global _OURS
    _OURS = tuple(dict.fromkeys(_OURS + classes))
    for name, module in list(sys.modules.items()):
        if not name.startswith("diffusers") or module is None:
            continue
        current = module.__dict__.get("CROSS_ATTENTION_PROCESSORS")
        if isinstance(current, tuple) and any(c not in current for c in _OURS):
            module.CROSS_ATTENTION_PROCESSORS = current + tuple(c for c in _OURS if c not in current)
    _patch_xformers_toggle()
    _patch_motion_conversion()


def _patch_xformers_toggle() -> None:
    from diffusers.models.attention_processor import Attention

    original = Attention.set_use_memory_efficient_attention_xformers
    if getattr(original, "_instantstyle", False):
        return

    @functools.wraps(original)
    def set_use_memory_efficient_attention_xformers(self, use_memory_efficient_attention_xformers, attention_op=None):
        if not _ours(getattr(self, "processor", None)):
            return original(self, use_memory_efficient_attention_xformers, attention_op)
        if use_memory_efficient_attention_xformers:
            import torch
            from diffusers.utils import is_xformers_available

            if not is_xformers_available():
                raise ModuleNotFoundError("Refer to https://github.com/facebookresearch/xformers for more information on how to install xformers", name="xformers")
            if not torch.cuda.is_available():
                raise ValueError("torch.cuda.is_available() should be True but is False. xformers' memory efficient attention is only available for GPU ")
        # ours stay in both directions: nothing to rebuild, nothing lost

    set_use_memory_efficient_attention_xformers._instantstyle = True
    Attention.set_use_memory_efficient_attention_xformers = set_use_memory_efficient_attention_xformers


def _patch_motion_conversion() -> None:
    from diffusers.models.unets.unet_motion_model import UNetMotionModel

    original = UNetMotionModel.__dict__["from_unet2d"].__func__
    if getattr(original, "_instantstyle", False):
        return

    @functools.wraps(original)
    def from_unet2d(cls, unet, *args, **kwargs):
        ours = {name: p for name, p in unet.attn_processors.items() if _ours(p)}
        if not ours:
            return original(cls, unet, *args, **kwargs)
        from diffusers.models.attention_processor import AttnProcessor2_0

        before = unet.attn_processors
        unet.set_attn_processor({name: AttnProcessor2_0() if name in ours else p for name, p in before.items()})
        try:
            model = original(cls, unet, *args, **kwargs)
        finally:
            unet.set_attn_processor(before)
        procs = model.attn_processors
        procs.update({name: p for name, p in copy.deepcopy(ours).items() if name in procs})  # one copy: shared gates stay shared
        model.set_attn_processor(procs)
        if unet.encoder_hid_proj is not None and unet.config.encoder_hid_dim_type == "ip_image_proj":
            model.config.encoder_hid_dim_type = "ip_image_proj"
            model.encoder_hid_proj = unet.encoder_hid_proj
        return model

    from_unet2d._instantstyle = True
    UNetMotionModel.from_unet2d = classmethod(from_unet2d)
