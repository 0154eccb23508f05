"""Drop-in diffusers processors that run decoupled cross-attention as ONE fused op.

``FusedIPAdapterAttnProcessor`` replaces ``IPAdapterAttnProcessor2_0``;
``FusedAttnProcessor`` replaces the plain processor of a cross-attention layer that
holds no IP weights (it drops the IP tokens the UNet passes to every layer).
Each parses its inputs (``attention_io``), calls ``decoupled_attention`` once and
projects out; inputs the op can't take go through ``unfused`` and the reason is kept
in ``processor.fallback_reason``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from ..kernels import decoupled_attention
from .attention_io import finish, project
from .unfused import unfused_decoupled_attention
from .validation import describe, require_scale


class ScaleList(list):
    """``processor.scale``: a list that tells its processor when an item is assigned.

    diffusers' ``set_ip_adapter_scale`` writes ``processor.scale[i] = s`` in place, which
    never reaches a property setter; this list forwards such writes so the tensor copy of
    the scales stays in sync.
    """

    def __init__(self, values, on_change):
        super().__init__(values)
        self._on_change = on_change

    def __setitem__(self, index, value):
        super().__setitem__(index, value)
        self._on_change()

    def __reduce_ex__(self, protocol):  # pickles/deep-copies as a plain list
        return (list, (list(self),))


def _stream_inputs(batch, heads, head_dim, to_k, to_v, states):
    """IP states ``[B, (n_images,) tokens, C]`` -> K, V ``(B, n_images*tokens, H, D)`` views."""
    return to_k(states).view(batch, -1, heads, head_dim), to_v(states).view(batch, -1, heads, head_dim)


def _run(p, streams, methods=()) -> torch.Tensor:
    """The one op call (or the unfused path when ``p`` says the op can't take it).

    ``methods``: editing methods attached at this layer (``methods.compose``); they add
    their contributions to the same single call.
    """
    if methods:
        from .methods.compose import run_methods

        return run_methods(methods, p, streams)
    if p.fallback_reason is not None:
        return unfused_decoupled_attention(p.q, p.k, p.v, streams, p.full_mask)
    ip_k = [s[0] for s in streams]
    ip_v = [s[1] for s in streams]
    scales = [s[2] for s in streams]
    masks = [s[3] for s in streams]
    return decoupled_attention(p.q, p.k, p.v, ip_k, ip_v, scales, masks, p.text_bias)


class FusedIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """``IPAdapterAttnProcessor2_0`` with the text and image branches fused into one op.

    Same constructor, attributes (``to_k_ip``, ``to_v_ip``, ``scale``, ``num_tokens``) and
    ``__call__``, so diffusers' ``set_ip_adapter_scale`` and ``unload_ip_adapter`` keep
    working.  Two additions:

    - ``adapter_ids``: which of the pipeline's IP-Adapters this layer holds weights for
      (``to_k_ip[j]`` belongs to adapter ``adapter_ids[j]``).  ``scale`` and
      ``num_tokens`` keep one entry per adapter of the pipeline, as diffusers expects.
      Layers outside an adapter's targets hold no weights for it.
    - ``gates``: per adapter None or a :class:`~instantstyle.processors.gating.StepGate`.
    """

    def __init__(self, hidden_size, cross_attention_dim=None, num_tokens=(4,), scale=1.0, adapter_ids: Optional[Sequence[int]] = None):
        num_tokens = list(num_tokens) if isinstance(num_tokens, (tuple, list)) else [num_tokens]
        n = len(num_tokens)
        ids = list(range(n)) if adapter_ids is None else [int(a) for a in adapter_ids]
        if any(not 0 <= a < n for a in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"adapter_ids: expected distinct indices in [0, {n}), got {list(adapter_ids)}")
        # Build K/V projections for the held adapters only, then restore the per-adapter lists.
        super().__init__(hidden_size, cross_attention_dim, [num_tokens[a] for a in ids], 1.0)
        if not isinstance(scale, list):
            scale = [scale] * n
        if len(scale) != n:
            raise ValueError(f"scale: expected one entry per IP-Adapter ({n}), got {len(scale)}")
        self.adapter_ids = ids
        self.num_tokens = num_tokens
        self.scale = scale
        self.gates: List = [None] * n
        self.fallback_reason: Optional[str] = None
        self.methods: List = []  # editing methods attached here (``methods.apply_method``)

    # Scales live twice: as the Python list diffusers reads and writes, and as a float32
    # buffer the forward reads.  The forward never branches on a scale's *value* under
    # torch.compile, so a compiled graph takes the buffer as an input (no recompile when
    # a scale changes, no scale-0 branch baked in), and the buffer is updated in place so
    # a CUDA graph that captured its address reads the new values.
    @property
    def scale(self):
        return self._scale

    @scale.setter
    def scale(self, value):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"scale: expected a list with one entry per IP-Adapter, got {describe(value)}")
        self._scale = ScaleList([require_scale(f"scale[{i}]", v) for i, v in enumerate(value)], self._sync_scale)
        self._sync_scale()

    def _sync_scale(self) -> None:
        rows = [v if isinstance(v, list) else [v] for v in self._scale]
        width = max([len(r) for r in rows] + [1])
        # a per-image list is only meaningful with masks; pad rows with their last value
        table = torch.tensor([r + r[-1:] * (width - len(r)) if r else [0.0] * width for r in rows], dtype=torch.float32)
        # Stored as the float32 *bits* in an int32 buffer: ``unet.half()`` casts floating
        # buffers, and a scale rounded to fp16/bf16 would bias every output against
        # diffusers' (which multiplies by the exact Python float).
        bits = table.view(torch.int32)
        current = self._buffers.get("scale_bits")
        if current is not None and current.shape == bits.shape:
            current.copy_(bits)
        else:
            device = current.device if current is not None else None
            self.register_buffer("scale_bits", bits.to(device), persistent=False)

    @property
    def scale_values(self) -> torch.Tensor:
        """``(adapters, images)`` float32 scales, a free view of the buffer."""
        return self.scale_bits.view(torch.float32)

    def _adapter_scale(self, adapter: int, image: int = 0) -> torch.Tensor:
        """0-D tensor: the scale of ``adapter`` (and masked ``image``) times its step gate."""
        table = self.scale_values
        value = table[adapter, min(image, table.shape[1] - 1)]
        gate = self.gates[adapter] if adapter < len(self.gates) else None
        return value if gate is None else value * gate.value.to(value.device)

    def _is_off(self, adapter: int) -> bool:
        """Eager mode skips an adapter whose scale is 0, as diffusers does (K/V projection
        included).  Under torch.compile the value is not read, see ``scale``."""
        if torch.compiler.is_compiling():
            return False
        s = self._scale[adapter]
        return all(x == 0 for x in s) if isinstance(s, list) else s == 0

    def _masks(self, ip_adapter_masks, ip_states) -> list:
        """One entry per adapter, None where it has no mask."""
        if ip_adapter_masks is None:
            return [None] * len(ip_states)
        if not isinstance(ip_adapter_masks, list):  # diffusers' legacy [num_adapters, 1, h, w] tensor
            ip_adapter_masks = list(ip_adapter_masks.unsqueeze(1))
        if not len(ip_adapter_masks) == len(self.num_tokens) == len(ip_states):
            raise ValueError(
                f"ip_adapter_masks: expected one entry per IP-Adapter ({len(self.num_tokens)} adapters, "
                f"{len(ip_states)} image states), got {len(ip_adapter_masks)}"
            )
        for i, mask in enumerate(ip_adapter_masks):
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
                raise ValueError(
                    f"ip_adapter_masks[{i}]: expected a tensor [1, num_images, height, width] "
                    f"(see diffusers' IPAdapterMaskProcessor), got {describe(mask)}"
                )
            if mask.shape[1] != ip_states[i].shape[1]:
                raise ValueError(f"ip_adapter_masks[{i}]: expected {ip_states[i].shape[1]} masks (one per image), got {mask.shape[1]}")
        return ip_adapter_masks

    def _check_scales(self, masks) -> None:
        """Per-image scale lists must match the masks.  Eager only: reading a Python scale
        under torch.compile would guard on its value (see ``scale``)."""
        if torch.compiler.is_compiling():
            return
        for i, (s, mask) in enumerate(zip(self._scale, masks)):
            if not isinstance(s, list):
                continue
            if mask is None and len(set(s)) > 1 and i in self.adapter_ids:
                raise ValueError(f"scale[{i}]: per-image scales {s} need ip_adapter_masks")
            if mask is not None and len(s) != mask.shape[1]:
                raise ValueError(f"scale[{i}]: expected {mask.shape[1]} per-image scales (one per mask), got {len(s)}")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, scale: float = 1.0, ip_adapter_masks=None):
        p = project(attn, hidden_states, encoder_hidden_states, attention_mask, temb, self.num_tokens[0])
        self.fallback_reason = p.fallback_reason
        masks = self._masks(ip_adapter_masks, p.ip_states)
        self._check_scales(masks)
        batch, n, heads, head_dim = p.q.shape
        streams = []  # (ip_k, ip_v, scale, mask): one softmax each
        for j, adapter in enumerate(self.adapter_ids):
            if adapter >= len(p.ip_states) or self._is_off(adapter):
                continue
            states, mask = p.ip_states[adapter], masks[adapter]
            to_k, to_v = self.to_k_ip[j], self.to_v_ip[j]
            if mask is None:  # all images of the adapter share one softmax
                streams.append((*_stream_inputs(batch, heads, head_dim, to_k, to_v, states), self._adapter_scale(adapter), None))
                continue
            for i in range(mask.shape[1]):  # with masks, one softmax, scale and mask per image
                m = IPAdapterMaskProcessor.downsample(mask[:, i], batch, n, 1).reshape(batch, n)
                k_i, v_i = _stream_inputs(batch, heads, head_dim, to_k, to_v, states[:, i])
                streams.append((k_i, v_i, self._adapter_scale(adapter, i), m.to(p.q.device)))
        return finish(attn, _run(p, streams, self.methods), p)


class FusedAttnProcessor(torch.nn.Module):
    """Cross-attention without IP weights: text attention only, through the same op.
    (Editing methods also install it on self-attention layers: the same code path.)

    The UNet hands every cross-attention layer the IP tokens; a layer outside all
    adapters' targets drops them here and does no IP work.  Constructible without
    arguments, so diffusers' ``unload_ip_adapter`` (which re-instantiates non-IP
    processors by class) keeps it.
    """

    def __init__(self):
        super().__init__()
        self.fallback_reason: Optional[str] = None
        self.methods: List = []  # editing methods attached here (``methods.apply_method``)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, scale: float = 1.0, ip_adapter_masks=None):
        # ``scale`` and ``ip_adapter_masks`` are declared so diffusers passes them without a warning
        p = project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.fallback_reason = p.fallback_reason
        return finish(attn, _run(p, [], self.methods), p)


def fallback_reasons(model) -> dict:
    """``{processor name: why}`` for every fused processor whose last call took the unfused path."""
    from .sites import unet_of

    return {
        name: proc.fallback_reason
        for name, proc in unet_of(model).attn_processors.items()
        if isinstance(proc, (FusedIPAdapterAttnProcessor, FusedAttnProcessor)) and proc.fallback_reason
    }
