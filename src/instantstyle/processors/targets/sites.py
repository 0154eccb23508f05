"""The attention layers of a diffusers UNet or DiT ("sites"), in ``attn_processors`` order.

A site is named by its ``attn_processors`` key, the name every diffusers API uses.
Only this module knows how to read those names; the registry and the loader work on
:class:`AttentionSite` records.

Kinds: a UNet layer is ``"cross"`` or ``"self"``.  A transformer (DiT) layer is
``"joint"`` (one softmax over [text ; image] with separate text and image weights:
Flux's double-stream ``transformer_blocks.N``, SD3's joint blocks) or ``"single"``
(Flux's ``single_transformer_blocks.N``: one stream over [text ; image]).  Every DiT
layer can hold IP weights (``takes_ip``); which ones a checkpoint fills is the
loader's business (XLabs Flux: double-stream only).

The Wan family (Wan 2.1 I2V/FLF2V, SkyReels-V2, ChronoEdit, Wan-Animate) has separate
self- and cross-attention per block, as a UNet: ``blocks.N.attn1`` is ``"self"``,
``blocks.N.attn2`` ``"cross"`` (its image branch is the one IP-like input).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..core.models import attention_modules, transformer_family

#: transformer families whose layers are self-/cross-attention (as a UNet's), not joint
CROSS_ATTENTION_FAMILIES = ("wan",)

#: attn_processors keys under these prefixes are not UNet attention layers
#: (IP-Adapter Plus' and SD3 IP-Adapters' image projections have Attention modules of their own).
_FOREIGN_PREFIXES = ("encoder_hid_proj.", "image_proj.")


@dataclass(frozen=True)
class AttentionSite:
    name: str  # attn_processors key: "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"
    kind: str  # "cross" or "self" (UNet); "joint" or "single" (DiT)
    heads: int
    head_dim: int
    motion: bool  # inside a motion module (temporal attention of a motion UNet)
    module: object = None  # the diffusers Attention module (None when unavailable)

    @property
    def path(self) -> str:
        """Module path without the trailing ``.processor``."""
        return self.name[: -len(".processor")] if self.name.endswith(".processor") else self.name

    @property
    def components(self) -> tuple:
        return tuple(self.path.split("."))

    @property
    def container(self) -> str:
        """The ``...attentions.N`` (or motion module) path that owns this layer."""
        parts = self.path.split(".")
        for i, part in enumerate(parts):
            if part in ("attentions", "motion_modules") and i + 1 < len(parts):
                return ".".join(parts[: i + 2])
        return ".".join(parts[:-1])

    @property
    def takes_ip(self) -> bool:
        """Where IP-Adapter layers go: diffusers' rule, by name (every layer but ``attn1``,
        outside motion modules); it fixes the checkpoint key ids, so it must not differ."""
        return not self.name.endswith("attn1.processor") and not self.motion


def _dit_kind(module) -> str:
    """Joint (own text projections) or single-stream: read from the module, not the name."""
    return "joint" if getattr(module, "added_kv_proj_dim", None) is not None else "single"


def attention_sites(unet) -> List[AttentionSite]:
    modules = attention_modules(unet)
    family = transformer_family(unet)
    dit = family is not None and family not in CROSS_ATTENTION_FAMILIES
    sites = []
    for name in unet.attn_processors:
        if name.startswith(_FOREIGN_PREFIXES):
            continue
        module: Optional[object] = modules.get(name)
        is_cross = bool(getattr(module, "is_cross_attention", not name.endswith("attn1.processor")))
        heads = int(getattr(module, "heads", 0))
        inner = getattr(getattr(module, "to_k", None), "out_features", 0)
        sites.append(
            AttentionSite(
                name=name,
                kind=_dit_kind(module) if dit else ("cross" if is_cross else "self"),
                heads=heads,
                head_dim=inner // heads if heads else 0,
                motion="motion_modules" in name.split("."),
                module=module,
            )
        )
    return sites


def ip_sites(unet) -> List[AttentionSite]:
    """Cross-attention sites that can take IP weights, in checkpoint key-id order."""
    return [s for s in attention_sites(unet) if s.takes_ip]


def ip_key_ids(unet) -> dict:
    """``{site name: id}`` of the original IP-Adapter layout: 1, 3, 5, ... over :func:`ip_sites`.

    Same numbering as diffusers' ``_convert_ip_adapter_attn_to_diffusers``.
    """
    return {s.name: 1 + 2 * i for i, s in enumerate(ip_sites(unet))}
