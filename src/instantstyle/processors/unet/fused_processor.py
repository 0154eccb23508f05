"""Drop-in diffusers processors.  Every one does the same four things:
``parse`` the layer's inputs, collect the contributions of what is attached there,
make ONE op call (``pipeline.attend``), ``project`` out.

- ``FusedIPAdapterAttnProcessor`` replaces ``IPAdapterAttnProcessor2_0``.  Its own
  contribution is IP-Adapter's streams (``ip_adapter.IPAdapterStreams``); a layer
  outside every adapter's targets holds no weights and contributes nothing, but stays
  an IP processor, so diffusers' ``unload_ip_adapter`` treats it as one.
- ``FusedAttnProcessor`` replaces ``AttnProcessor(2_0)`` where editing methods attach to
  a layer without IP-Adapter (self-attention, plain cross-attention).

Inputs the op can't take go through the unfused implementation; the reason is kept in
``processor.fallback_reason``.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from ..core.drop_in import DropInProcessor
from ..core.engine import attend
from ..core.ip_adapter import IPAdapterStreams
from ..core.model_state import attached_at
from ..core.models import unet_of
from ..core.step_cache import OwnsStepCaches, StepCache
from .layer_inputs import parse, project


def _run(attn, layer, own) -> torch.Tensor:
    entries = attached_at(attn)
    if not entries:
        return attend(layer, own)
    first = entries[0]
    return attend(layer, [*own, *((e.contributor, e.weight) for e in entries)], first.site, first.state)


class FusedIPAdapterAttnProcessor(DropInProcessor, OwnsStepCaches, IPAdapterStreams, IPAdapterAttnProcessor2_0):
    """``IPAdapterAttnProcessor2_0`` with the text and image branches fused into one op.

    Same constructor, attributes (``to_k_ip``, ``to_v_ip``, ``scale``, ``num_tokens``,
    ``hidden_size``, ``cross_attention_dim``) and ``__call__``, so diffusers'
    ``set_ip_adapter_scale`` and ``unload_ip_adapter`` keep working.  Additions
    (``IPAdapterStreams``): ``adapter_ids`` (which of the pipeline's adapters this layer
    holds weights for) and ``gates`` (per adapter None or a ``StepGate``).
    """

    counts_as_cross_attention = True

    def __init__(self, hidden_size, cross_attention_dim=None, num_tokens=(4,), scale=1.0, adapter_ids=None):
        num_tokens = list(num_tokens) if isinstance(num_tokens, (tuple, list)) else [num_tokens]
        ids = self.check_adapter_ids(adapter_ids, len(num_tokens))
        # K/V projections for the held adapters only; then the per-adapter lists
        IPAdapterAttnProcessor2_0.__init__(self, hidden_size, cross_attention_dim, [num_tokens[a] for a in ids], 1.0)
        self.init_streams(ids, num_tokens, scale)
        self.fallback_reason: Optional[str] = None
        self.text_kv_cache = StepCache()  # the layer's text K/V while the prompt is unchanged

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, scale: float = 1.0, ip_adapter_masks=None):
        layer = parse(attn, hidden_states, encoder_hidden_states, attention_mask, temb, self.num_tokens[0], ip_adapter_masks,
                      self.text_kv_cache)
        if self.fallback_reason is not layer.fallback_reason:  # written only on change: nn.Module.__setattr__ is slow
            self.fallback_reason = layer.fallback_reason
        return project(attn, _run(attn, layer, ((self, 1.0),)), layer)


class FusedAttnProcessor(DropInProcessor, OwnsStepCaches, torch.nn.Module):
    """Attention without IP weights, through the same pipeline and op.

    Constructible without arguments, so diffusers (which re-instantiates non-IP
    processors by class) keeps it; what is attached lives on the layer, not here.
    """

    counts_as_cross_attention = True

    def __init__(self):
        super().__init__()
        self.fallback_reason: Optional[str] = None
        self.text_kv_cache = StepCache()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, scale: float = 1.0, ip_adapter_masks=None):
        # ``scale`` and ``ip_adapter_masks`` are declared so diffusers passes them without a warning
        layer = parse(attn, hidden_states, encoder_hidden_states, attention_mask, temb, text_cache=self.text_kv_cache)
        if self.fallback_reason is not layer.fallback_reason:
            self.fallback_reason = layer.fallback_reason
        return project(attn, _run(attn, layer, ()), layer)


def fallback_reasons(model) -> dict:
    """``{processor name: why}`` for every fused processor whose last call took the unfused path."""
    return {
        name: proc.fallback_reason
        for name, proc in unet_of(model).attn_processors.items()
        if getattr(type(proc), "instantstyle_pipeline", False) and proc.fallback_reason
    }
