"""StyleAligned (Hertz et al. 2024, google/style-aligned ``sa_handler.py``): every image
of a batch shares self-attention with the batch's reference image.

At each chosen self-attention layer, per CFG half (the reference is the half's first
row, so rows ``0`` and ``B//2``):

1. AdaIN (kind 4): queries and keys of every image move to the reference's per-head,
   per-channel token statistics, ``x' = (x - mean_x) / std_x * std_ref + mean_ref``
   with ``std = sqrt(var + 1e-5)`` (unbiased var).  The reference maps to itself.
2. Shared attention (kind 2): each image attends over ``[own K' ; reference K']`` with
   values ``[own V ; reference V]`` in ONE softmax.  As upstream, the reference also
   appends its own keys.  ``keys_scale`` multiplies the appended reference keys of the
   non-reference rows (a logit scale); ``score_shift`` adds to every appended key's
   logit (upstream's ``shared_score_shift``).
3. Shared norms (upstream's ``register_shared_norm``, on by default as upstream):
   with ``share_group_norm`` every ``nn.GroupNorm`` of the UNet (all of them, whatever
   ``target`` and ``only_self_level`` pick, as upstream) computes its statistics over
   ``[own features ; the reference's]`` and keeps its own output
   (:mod:`.shared_norms`).  ``share_layer_norm`` is accepted for upstream's signature
   but patches nothing: a UNet's LayerNorms are per token, where sharing is a no-op.
   The norms follow the method's ``cfg`` and step gate, and ``remove_method`` restores
   them exactly.

On Flux double-stream and SD3 joint blocks (:mod:`instantstyle.processors.dit.joint_methods`)
the same hooks see the image tokens of the joint sequence only: AdaIN of the image
queries/keys (after qk-norm, before RoPE; statistics over image tokens), the
reference's image keys/values appended to every row's one joint softmax (text query
rows included); text queries/keys untouched and the reference's text not appended.
DiTs have no GroupNorm and only per-token LayerNorms, so ``share_group_norm`` /
``share_layer_norm`` patch nothing there.
"""
from __future__ import annotations

import torch

from ..core.models import transformer_family
from ..core.validation import describe, require_fraction, require_number
from .base import AttentionCall, EditingMethod, reference_rows
from .shared_norms import share_group_norms, unshare_group_norms

EPS = 1e-5


def adain(x, rows):
    """AdaIN of ``x`` ``(B, L, H, D)`` toward ``x[rows]``; statistics over the token axis."""
    mean = x.mean(dim=1, keepdim=True)
    std = (x.var(dim=1, keepdim=True) + EPS).sqrt()
    return (x - mean) / std * std[rows] + mean[rows]


def switch_vector(total: int, level: float) -> list:
    """Upstream's ``_get_switch_vec``: which of ``total`` layers stay unshared for
    ``only_self_level`` = ``level`` (a fraction, evenly spaced)."""
    if level == 0:
        return [False] * total
    if level == 1:
        return [True] * total
    flip = level > 0.5
    level = 1 - level if flip else level
    count = int(level * total)
    if count == 0:
        return [flip] * total
    vec = [i % (total // count) == 0 for i in range(total)]
    return [not v for v in vec] if flip else vec


class StyleAligned(EditingMethod):
    """Shared self-attention with AdaIN toward the first image of each CFG half.

    Args:
        target: self-attention layers (default: all of them).
        adain_queries, adain_keys, adain_values: which tensors AdaIN moves toward the
            reference (upstream defaults: queries and keys).
        keys_scale: multiplies the appended reference keys of non-reference rows
            (upstream ``shared_score_scale``), default 1.
        score_shift: added to the logits of every appended reference key (upstream
            ``shared_score_shift``), default 0.
        only_self_level: fraction of the targeted layers, evenly spaced, left unshared.
        share_group_norm: GroupNorm statistics of every UNet norm layer over own +
            reference features (upstream default True).
        share_layer_norm: upstream's LayerNorm sharing (default True); a mathematical
            no-op on a UNet's per-token LayerNorms, so nothing is patched for it.
        cfg: True when the batch is ``[unconditional; conditional]`` (each half has its
            own reference); False for a batch without CFG (row 0 is the reference).
        start_at, end_at, name: see :class:`EditingMethod`.
    """

    name = "style_aligned"
    kind = "self"
    default_target = "all"

    def __init__(self, target=None, *, adain_queries: bool = True, adain_keys: bool = True, adain_values: bool = False,
                 keys_scale: float = 1.0, score_shift: float = 0.0, only_self_level: float = 0.0, cfg: bool = True,
                 share_group_norm: bool = True, share_layer_norm: bool = True, start_at: float = 0.0, end_at: float = 1.0, name=None):
        super().__init__(target, start_at=start_at, end_at=end_at, name=name)
        for flag, value in (("adain_queries", adain_queries), ("adain_keys", adain_keys), ("adain_values", adain_values), ("cfg", cfg),
                            ("share_group_norm", share_group_norm), ("share_layer_norm", share_layer_norm)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag}: expected True or False, got {describe(value)}")
        self.adain_queries, self.adain_keys, self.adain_values = adain_queries, adain_keys, adain_values
        self.keys_scale = require_number("keys_scale", keys_scale)
        self.score_shift = require_number("score_shift", score_shift)
        self.only_self_level = require_fraction("only_self_level", only_self_level)
        self.halves = 2 if cfg else 1
        self.share_group_norm, self.share_layer_norm = share_group_norm, share_layer_norm

    def patch_modules(self, unet):
        # LayerNorm: upstream appends the reference tokens on dim -2, but the UNet's
        # LayerNorms normalise each token over its channels alone, so the kept rows come
        # out the same; share_layer_norm patches nothing (see shared_norms).
        if self.share_group_norm and transformer_family(unet) is None:  # a DiT has no GroupNorm to share
            share_group_norms(unet, self.halves, self.gate, owner=self.name, label="StyleAligned batch")

    def unpatch_modules(self, unet):
        unshare_group_norms(unet, self.name)

    def select_sites(self, sites):
        unshared = switch_vector(len(sites), self.only_self_level)
        return [s for s, skip in zip(sites, unshared) if not skip]

    def _rows(self, call: AttentionCall):
        return reference_rows(call.batch, self.halves, "StyleAligned batch", call.q.device)

    def transform_qk(self, call):
        rows = self._rows(call)
        q = adain(call.q, rows) if self.adain_queries else call.q
        k = adain(call.k, rows) if self.adain_keys else call.k
        return q, k

    def replace_kv(self, call):
        return call.k, (adain(call.v, self._rows(call)) if self.adain_values else call.v)

    def joint_kv(self, call):
        rows = self._rows(call)
        k, v = call.k[rows], call.v[rows]
        if self.keys_scale != 1.0:
            is_ref = rows == torch.arange(call.batch, device=rows.device)
            factor = is_ref.to(k.dtype) + (~is_ref).to(k.dtype) * self.keys_scale
            k = k * factor[:, None, None, None]
        bias = None
        if self.score_shift != 0.0:
            dtype = torch.float64 if k.dtype == torch.float64 else torch.float32  # the op's bias precision
            bias = torch.full(k.shape[:2], self.score_shift, dtype=dtype, device=k.device)
        return k, v, bias
