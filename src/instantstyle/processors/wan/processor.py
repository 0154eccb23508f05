"""Drop-in Wan-family processors: each cross-attention layer with an image branch is ONE
op call (``engine.attend``): the text keys as the op's text keys, the image branch
``(norm_added_k(add_k_proj(img)), add_v_proj(img))`` as one stream with a scale.

diffusers computes ``sdpa(q, k, v) + sdpa(q, k_img, v_img)`` (two attention calls, two
casts, an add), then ``to_out``.  Here the image stream carries the layer's
``image_scale`` (1 = diffusers' math) times its step gate, so the native image branch
gets the per-block control diffusers lacks (:func:`~instantstyle.processors.wan.image_scale.set_image_scale`).
A layer at scale 0 makes no image-branch work at all: no ``add_k_proj``/``add_v_proj``,
no second softmax (the scale is a Python float, read eagerly; under ``torch.compile``
a changed scale recompiles).

Editing methods attach through the registry (``methods.apply_method``): at ``attn2``
they join the same op call; at ``attn1`` (self-attention) a layer that holds methods
runs :mod:`.self_attention` (one op call, RoPE between AdaIN and the reference keys).
The text and image K/V are reused within a run (:mod:`.context_cache`).

Everything else goes to diffusers' own ``__call__`` unchanged: self-attention without
methods (long keys, RoPE: diffusers' dispatcher, attention backends, context parallelism), a
cross-attention layer without an image branch (Wan T2V: one softmax, nothing to fuse),
and a cross-attention call given rotary embeddings (Wan's blocks never pass them).

One class per diffusers class (each model file defines its own processor class:
``transformer_wan.WanAttnProcessor``, ``transformer_chronoedit.WanAttnProcessor``,
``transformer_wan_animate.WanAttnProcessor``, ``SkyReelsV2AttnProcessor``), so
``isinstance`` checks against diffusers' class hold, and every subclass a user writes
gets its signature and registration from :class:`DropInProcessor`.
"""
from __future__ import annotations

import math

import torch
from diffusers.models.transformers import (
    transformer_chronoedit,
    transformer_skyreels_v2,
    transformer_wan,
    transformer_wan_animate,
)

from ..core.contributors import AttentionCall, Contributor
from ..core.drop_in import DropInProcessor
from ..core.engine import attend
from ..core.gating import StepGate
from ..core.model_state import attached_at
from ..core.validation import describe, require_number
from .context_cache import caches_for
from .layer import image_kv, parse, project
from .self_attention import self_attention


class ImageStream(Contributor):
    """The image branch of one layer call: one stream, ``(k_img, v_img, scale x gate)``.
    Built by the processor for the call (the projections live on the layer)."""

    __slots__ = ("attn", "cache", "context", "processor")
    name = "wan_image"
    trusted = True  # the layer's own projections; the scale a 0-D tensor on q's device

    def __init__(self, processor, attn, context, cache):
        self.processor, self.attn, self.context, self.cache = processor, attn, context, cache

    def streams(self, call: AttentionCall):
        image = call.ip_states[0] if call.ip_states else None
        if image is None or image.shape[1] == 0:  # diffusers: attention over no keys is 0
            return []
        k, v = image_kv(self.attn, self.context, image, self.cache)
        n = self.attn.heads
        return [(k.unflatten(-1, (n, -1)), v.unflatten(-1, (n, -1)), self.processor.scale_on(call.q), None)]


class WanCrossAttention:
    """The fused ``__call__`` and the image-branch controls, shared by every Wan-family class.

    ``image_scale``: the image branch's weight in this layer (1.0: diffusers' math; 0:
    no image-branch work).  ``image_gate``: None, or a :class:`StepGate` outside which
    the branch contributes 0.  ``gates`` is what the model's step hook updates."""

    #: diffusers' processor class this one replaces (set by each subclass below)
    diffusers_class = None

    def init_image_branch(self, image_scale: float = 1.0, image_gate: StepGate | None = None) -> None:
        self._scale_cells = {}
        self.image_scale = image_scale
        self.image_gate = image_gate
        self.fallback_reason = None

    # -- controls ---------------------------------------------------------------------------
    @property
    def image_scale(self) -> float:
        return self._image_scale

    @image_scale.setter
    def image_scale(self, value) -> None:
        value = require_number("image_scale", value)
        if not math.isfinite(value):
            raise ValueError(f"image_scale: expected a finite number, got {value}")
        self._image_scale = value
        for cell in self._scale_cells.values():  # in place: a captured CUDA graph reads the new value
            cell.fill_(value)

    @property
    def image_gate(self) -> StepGate | None:
        return self._image_gate

    @image_gate.setter
    def image_gate(self, gate) -> None:
        if gate is not None and not isinstance(gate, StepGate):
            raise TypeError(f"image_gate: expected a StepGate or None, got {describe(gate)}")
        self._image_gate = gate

    @property
    def gates(self) -> list:
        return [] if self._image_gate is None else [self._image_gate]

    def scale_on(self, q: torch.Tensor) -> torch.Tensor:
        """The stream scale as the op takes it: a 0-D tensor on q's device in the
        accumulation dtype (fp64 for fp64, else fp32), times the gate's value there."""
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        key = (q.device, dtype)
        cell = self._scale_cells.get(key)
        if cell is None:
            with torch.inference_mode(False):  # a normal tensor: fill_ may update it later
                cell = torch.full((), self._image_scale, dtype=dtype, device=q.device)
            if not torch.compiler.is_compiling():
                self._scale_cells[key] = cell
        gate = self._image_gate
        if gate is None or gate.always_open:
            return cell
        return cell * gate.value.to(q.device, dtype)

    # -- the call ---------------------------------------------------------------------------
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None and attention_mask is None and attached_at(attn):
            return self_attention(attn, hidden_states, rotary_emb)  # editing methods on attn1
        if encoder_hidden_states is None or attn.add_k_proj is None or rotary_emb is not None:
            return self.diffusers_class.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        key, text_cache, image_cache = caches_for(attn, encoder_hidden_states)  # per-run K/V (context_cache)
        layer = parse(attn, hidden_states, encoder_hidden_states, attention_mask, text_cache, key)
        if self.fallback_reason is not layer.fallback_reason:
            self.fallback_reason = layer.fallback_reason
        on = self._image_scale != 0 and layer.ip_states and layer.ip_states[0].shape[1] > 0
        own = ((ImageStream(self, attn, key, image_cache), 1.0),) if on else ()
        entries = attached_at(attn)
        if entries:
            out = attend(layer, [*own, *((e.contributor, e.weight) for e in entries)], entries[0].site, entries[0].state)
        else:
            out = attend(layer, own)
        return project(attn, out, layer.q)


def _fused(base, name: str):
    """``Fused<diffusers class name>``: ``WanCrossAttention`` over diffusers' ``base``."""

    def __init__(self, image_scale: float = 1.0, image_gate: StepGate | None = None):
        base.__init__(self)
        self.init_image_branch(image_scale, image_gate)

    doc = (f"``{base.__module__}.{base.__name__}`` with each image-branch cross-attention call fused "
           "into one op call; see :class:`WanCrossAttention`.")
    return type(name, (DropInProcessor, WanCrossAttention, base),
                {"__init__": __init__, "__doc__": doc, "__module__": __name__, "__qualname__": name, "diffusers_class": base})


FusedWanAttnProcessor = _fused(transformer_wan.WanAttnProcessor, "FusedWanAttnProcessor")
FusedSkyReelsV2AttnProcessor = _fused(transformer_skyreels_v2.SkyReelsV2AttnProcessor, "FusedSkyReelsV2AttnProcessor")
FusedChronoEditAttnProcessor = _fused(transformer_chronoedit.WanAttnProcessor, "FusedChronoEditAttnProcessor")
FusedWanAnimateAttnProcessor = _fused(transformer_wan_animate.WanAttnProcessor, "FusedWanAnimateAttnProcessor")

#: diffusers' processor class -> ours (exact classes: a user's own subclass is left alone)
FUSED_BY_CLASS = {cls.diffusers_class: cls for cls in (FusedWanAttnProcessor, FusedSkyReelsV2AttnProcessor,
                                                       FusedChronoEditAttnProcessor, FusedWanAnimateAttnProcessor)}
WAN_CLASSES = tuple(FUSED_BY_CLASS.values())
