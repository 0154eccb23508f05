"""IP-Adapter as a contributor: its streams, from the K/V projections a layer holds.

Mixed into ``FusedIPAdapterAttnProcessor``, which keeps diffusers' attributes
(``to_k_ip``/``to_v_ip``: the held adapters' projections; ``scale`` and ``num_tokens``:
one entry per adapter of the pipeline, as diffusers expects).  A layer outside an
adapter's targets holds no weights for it and makes no stream for it.

Scales live twice: as the Python list diffusers reads and writes
(``set_ip_adapter_scale`` assigns items in place), and as a float32 buffer the forward
reads.  The forward never branches on a scale's *value* under ``torch.compile``, so a
compiled graph takes the buffer as an input (no recompile when a scale changes, no
scale-0 branch baked in), and the buffer is updated in place so a CUDA graph that
captured its address reads the new values.

Per adapter, ``embeds_scaling`` says where the scale enters (``embeds_scaling``: output,
K and V, with or without the C penalty, mean(V)), and ``swap_halves`` turns on the
precise weight types' CFG-half swap (:func:`swap_halves`).  A layer whose held adapters
are all at scale 0 returns no stream before any other work (eager; read from a tuple
kept with the scales, never from a tensor).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from diffusers.image_processor import IPAdapterMaskProcessor

from .contributors import AttentionCall, Contributor
from .embeds_scaling import V_ONLY, scale_embeds
from .projections import linear, plain_linear, weights
from .step_cache import StepCache
from .validation import describe, require_scale


class ScaleList(list):
    """``processor.scale``: a list that tells its processor when an item is assigned
    (an in-place write never reaches a property setter).  It pickles and deep-copies
    with its owner, so a copied model's ``set_ip_adapter_scale`` still reaches the
    copy's buffer."""

    def __init__(self, values, owner):
        super().__init__(values)
        self.owner = owner

    def __setitem__(self, index, value):
        super().__setitem__(index, value)
        self.owner._sync_scale()


class IPAdapterStreams(Contributor):
    """The IP-Adapter contribution of one layer (kind 1: one stream per held adapter,
    or per masked image)."""

    name = "ip_adapter"
    trusted = True  # streams: the layer's own projections, scales from the buffer (see streams)

    @staticmethod
    def check_adapter_ids(adapter_ids: Optional[Sequence[int]], n: int) -> List[int]:
        ids = list(range(n)) if adapter_ids is None else [int(a) for a in adapter_ids]
        if any(not 0 <= a < n for a in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"adapter_ids: expected distinct indices in [0, {n}), got {list(adapter_ids)}")
        return ids

    def init_streams(self, adapter_ids: List[int], num_tokens: list, scale) -> None:
        n = len(num_tokens)
        if not isinstance(scale, list):
            scale = [scale] * n
        if len(scale) != n:
            raise ValueError(f"scale: expected one entry per IP-Adapter ({n}), got {len(scale)}")
        self.adapter_ids = adapter_ids
        self.num_tokens = num_tokens
        self.scale = scale
        self.gates: List = [None] * n
        self.embeds_scaling: list[str] = [V_ONLY] * n  # per adapter, see ``embeds_scaling``
        self.swap_halves: list[bool] = [False] * n  # per adapter: the precise types' CFG-half swap
        self.kv_caches = [StepCache() for _ in adapter_ids]  # per held adapter: K/V of unchanged IP tokens

    # -- scales ---------------------------------------------------------------------------
    @property
    def scale(self):
        return self._scale

    @scale.setter
    def scale(self, value):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"scale: expected a list with one entry per IP-Adapter, got {describe(value)}")
        adapters = len(self.__dict__.get("num_tokens", value))
        if len(value) != adapters:
            raise ValueError(f"scale: expected one entry per IP-Adapter ({adapters}), got {len(value)}: {list(value)}")
        self._scale = ScaleList([require_scale(f"scale[{i}]", v) for i, v in enumerate(value)], self)
        self._sync_scale()

    def _sync_scale(self) -> None:
        rows = [v if isinstance(v, list) else [v] for v in self._scale]
        # per adapter: every scale 0, read by the eager skip (a tuple: no per-call list walk)
        self.__dict__["_off"] = tuple(all(x == 0 for x in r) for r in rows)
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
        return self._gated(self._scale_cell(adapter, image), adapter)

    def _gated(self, value, adapter: int):
        gate = self.gates[adapter] if adapter < len(self.gates) else None
        if gate is None:
            return value
        gate_value = gate.value.to(value.device) if isinstance(value, torch.Tensor) else gate.value
        return value * gate_value

    def _scale_cell(self, adapter: int, image: int = 0) -> torch.Tensor:
        """0-D tensor: the ungated scale of ``adapter`` (and masked ``image``), a view of the buffer."""
        bits = self._buffers["scale_bits"]
        cells = self.__dict__.get("_scale_cells")
        if cells is None or cells[0] is not bits:  # views of the buffer, rebuilt when it is replaced
            table = bits.view(torch.float32)
            cells = (bits, [[table[a, i] for i in range(table.shape[1])] for a in range(table.shape[0])])
            # not inside a traced graph (it must not mutate the module), nor in inference
            # mode (views made there can't join autograd later)
            if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled():
                self.__dict__["_scale_cells"] = cells
        row = cells[1][adapter]
        return row[min(image, len(row) - 1)]

    def _is_off(self, adapter: int) -> bool:
        """Eager mode skips an adapter whose scale is 0, as diffusers does (K/V projection
        included).  Under torch.compile the value is not read, see the module doc."""
        if torch.compiler.is_compiling():
            return False
        return self._off[adapter]

    # -- masks ------------------------------------------------------------------------------
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
        """Per-image scale lists must match the masks.  Eager only (see the module doc)."""
        if torch.compiler.is_compiling() or not any(isinstance(s, list) for s in self._scale):
            return
        for i, (s, mask) in enumerate(zip(self._scale, masks)):
            if not isinstance(s, list):
                continue
            if mask is None and len(set(s)) > 1 and i in self.adapter_ids:
                raise ValueError(f"scale[{i}]: per-image scales {s} need ip_adapter_masks")
            if mask is not None and len(s) != mask.shape[1]:
                raise ValueError(f"scale[{i}]: expected {mask.shape[1]} per-image scales (one per mask), got {len(s)}")

    # -- the contribution ---------------------------------------------------------------------
    def streams(self, call: AttentionCall):
        if not self.adapter_ids or not call.ip_states:
            return []
        if not torch.compiler.is_compiling() and all(self._off[a] for a in self.adapter_ids):
            return []  # a layer at weight 0 (drop-in gating, a weight type's missing module): no IP work
        masks = self._masks(call.ip_adapter_masks, call.ip_states)
        self._check_scales(masks)
        batch, n, heads, head_dim = call.q.shape
        modes = self.__dict__.get("embeds_scaling") or [V_ONLY] * len(self.num_tokens)
        swaps = self.__dict__.get("swap_halves") or [False] * len(self.num_tokens)
        out = []  # (ip_k, ip_v, scale, mask): one softmax each
        # zip over the ModuleLists: indexing one costs microseconds of Python per call
        for adapter, to_k, to_v, cache in zip(self.adapter_ids, self.to_k_ip, self.to_v_ip, self.kv_caches):
            if adapter >= len(call.ip_states) or self._is_off(adapter):
                continue
            states, mask, swap = call.ip_states[adapter], masks[adapter], swaps[adapter]
            if mask is None:  # all images of the adapter share one softmax
                # unchanged IP tokens and bare projections: last step's K/V (``step_cache``).  The
                # precise swap moves whole rows, so it is done on the cached K/V (a row of zeros
                # projects to the bias): a swapped-states tensor would be new every step and miss
                if plain_linear(to_k) and plain_linear(to_v):
                    k, v = cache.get((states, *weights(to_k), *weights(to_v)),
                                     lambda: (linear(to_k, states), linear(to_v, states)))
                    if swap:
                        k, v = swap_halves(k, to_k.bias), swap_halves(v, to_v.bias)
                else:
                    swapped = swap_halves(states) if swap else states
                    k, v = linear(to_k, swapped), linear(to_v, swapped)
                k, v, factor = scale_embeds(k, v, self._scale_cell(adapter), modes[adapter])
                out.append((k.view(batch, -1, heads, head_dim), v.view(batch, -1, heads, head_dim), self._gated(factor, adapter), None))
                continue
            if swap:
                states = swap_halves(states)
            for i in range(mask.shape[1]):  # with masks, one softmax, scale and mask per image
                m = IPAdapterMaskProcessor.downsample(mask[:, i], batch, n, 1).reshape(batch, n)
                k, v, factor = scale_embeds(to_k(states[:, i]), to_v(states[:, i]), self._scale_cell(adapter, i), modes[adapter])
                out.append((k.view(batch, -1, heads, head_dim), v.view(batch, -1, heads, head_dim), self._gated(factor, adapter),
                            m.to(call.q.device)))
        return out


def swap_halves(states: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The precise types' swap on a CFG batch ``[uncond ; cond]``: the unconditional half
    gets the conditional half's image tokens, the conditional half zeros (ComfyUI's
    ``uncond = cond; cond = cond * 0``).  An odd batch (no CFG) is left alone.  On projected
    tokens pass the projection's ``bias``: zero tokens project to it, not to zeros."""
    half, odd = divmod(states.shape[0], 2)
    if odd or not half:
        return states
    cond = states[half:]
    return torch.cat([cond, torch.zeros_like(cond) if bias is None else bias.to(cond.dtype).expand_as(cond)])
