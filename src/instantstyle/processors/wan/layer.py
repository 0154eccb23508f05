"""The Wan family's ends of the per-layer pipeline: ``parse`` turns an ``attn2`` call into
:class:`LayerInputs`, ``project`` turns the op's output into the processor's return value.

diffusers' ``WanAttnProcessor`` (and its copies in SkyReels-V2, ChronoEdit, Wan-Animate),
step for step:

- ``encoder_hidden_states`` holds the image tokens first, then the text; the split is by
  position, ``len - 512`` image tokens (512 is hard-coded there: "the context length of
  the text encoder").  The same Python slices are taken here, so every input splits
  exactly as diffusers splits it (a context shorter than 512 tokens gives an empty image
  part, whose attention is 0 in diffusers too).
- query ``norm_q(to_q(x))``, text key ``norm_k(to_k(text))``, text value ``to_v(text)``:
  RMSNorm over the full inner dimension (across heads), before the head split.
- image key ``norm_added_k(add_k_proj(img))``, image value ``add_v_proj(img)`` (no norm).
- fused projections (``fuse_projections``): ``to_kv`` and ``to_added_kv``, as diffusers.
- no RoPE in cross-attention; softmax scale ``1/sqrt(head_dim)``.

Per-run caches: the text and image K/V are computed through the core step cache
(``StepCache.get``) keyed on the layer's context tensor and every weight they depend on,
as the UNet path keys its text K/V.  diffusers' Wan forward builds that context anew on
every call, so the key is the run's bit-equal canonical context (``context_cache``).
"""
from __future__ import annotations

import torch
from torch.nn.modules import module as _module

from ..core.engine import LayerInputs
from ..core.projections import linear, plain_linear, weights
from ..core.step_cache import StepCache

#: diffusers' hard-coded text length of a Wan cross-attention context
TEXT_LEN = 512


def split_context(attn, encoder_hidden_states):
    """``(text, image)``: diffusers' split by position; ``image`` is None for a layer
    without an image branch (Wan T2V, Wan 2.2)."""
    if attn.add_k_proj is None:
        return encoder_hidden_states, None
    n = encoder_hidden_states.shape[1] - TEXT_LEN
    return encoder_hidden_states[:, n:], encoder_hidden_states[:, :n]


def _plain_norm(module) -> bool:
    """A bare ``torch.nn.RMSNorm`` (no subclass, no hooks): its output depends on its input and weight only."""
    return (type(module) is torch.nn.RMSNorm and not (module._forward_hooks or module._forward_pre_hooks)
            and "forward" not in module.__dict__
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks))


def _cached(cache: StepCache | None, context, projections, norm, project):
    """``project()``, through ``cache`` when every module it reads is bare (the key then
    holds every tensor the result depends on)."""
    if cache is None or not all(plain_linear(m) for m in projections) or not _plain_norm(norm):
        return project()
    key = [context]
    for m in (*projections, norm):
        key += weights(m)
    return cache.get(tuple(key), project)


def _kv(attn, context, states, fused_name: str, k_name: str, v_name: str, norm_name: str, cache):
    """``(norm(k_proj(states)), v_proj(states))`` with the layer's own projection names,
    fused (one ``*_kv`` Linear, diffusers' ``fuse_projections``) or not."""
    fused = getattr(attn, "fused_projections", False)
    mods = (getattr(attn, fused_name),) if fused else (getattr(attn, k_name), getattr(attn, v_name))
    norm = getattr(attn, norm_name)

    def project():
        k, v = linear(mods[0], states).chunk(2, dim=-1) if fused else (linear(mods[0], states), linear(mods[1], states))
        return norm(k), v

    return _cached(cache, context, mods, norm, project)


def text_kv(attn, context: torch.Tensor, text: torch.Tensor, cache: StepCache | None = None):
    """``(norm_k(to_k(text)), to_v(text))``, ``(B, Lt, H*D)`` each."""
    return _kv(attn, context, text, "to_kv", "to_k", "to_v", "norm_k", cache)


def image_kv(attn, context: torch.Tensor, image: torch.Tensor, cache: StepCache | None = None):
    """``(norm_added_k(add_k_proj(img)), add_v_proj(img))``, ``(B, Li, H*D)`` each."""
    return _kv(attn, context, image, "to_added_kv", "add_k_proj", "add_v_proj", "norm_added_k", cache)


def heads(t: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, L, H*D)`` -> ``(B, L, H, D)``, a view."""
    return t.unflatten(-1, (n, -1))


def parse(attn, hidden_states, encoder_hidden_states, attention_mask=None, text_cache: StepCache | None = None,
          cache_key: torch.Tensor | None = None) -> LayerInputs:
    """A cross-attention call as :class:`LayerInputs`; ``ip_states`` holds the image tokens
    (``[img]``, or ``[]`` for a layer without an image branch).  ``cache_key``: the tensor
    the text K/V are cached under (``context_cache``: a bit-equal earlier context), by
    default the context itself."""
    text, image = split_context(attn, encoder_hidden_states)
    q = heads(attn.norm_q(linear(attn.to_q, hidden_states)), attn.heads)
    k, v = text_kv(attn, encoder_hidden_states if cache_key is None else cache_key, text, text_cache)
    reason = None
    if attention_mask is not None:  # diffusers hands it to SDPA on the text keys as it is
        reason = (f"attention_mask of shape {tuple(attention_mask.shape)} on the text keys: the unfused path takes it "
                  "as diffusers does (Wan's own blocks pass none)")
    return LayerInputs(
        q=q, k=heads(k, attn.heads), v=heads(v, attn.heads), text_bias=None, full_mask=attention_mask,
        fallback_reason=reason, ip_states=[] if image is None else [image], residual=None,
        input_shape=tuple(hidden_states.shape),
    )


def project(attn, out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, N, H, D)`` op output -> ``to_out`` (linear, dropout), in the queries' dtype."""
    hidden_states = out.reshape(out.shape[0], out.shape[1], -1)
    if hidden_states.dtype != like.dtype:
        hidden_states = hidden_states.to(like.dtype)
    hidden_states = linear(attn.to_out[0], hidden_states)
    dropout = attn.to_out[1]
    if type(dropout) is not torch.nn.Dropout or (dropout.training and dropout.p):
        hidden_states = dropout(hidden_states)
    return hidden_states
