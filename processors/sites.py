"""The attention layers of a diffusers UNet ("sites"), in ``attn_processors`` order.

A site is named by its ``attn_processors`` key, the name every diffusers API uses.
Only this module knows how to read those names; the registry and the loader work on
:class:`AttentionSite` records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

#: attn_processors keys under these prefixes are not UNet attention layers
#: (IP-Adapter Plus' image projection has Attention modules of its own).
_FOREIGN_PREFIXES = ("encoder_hid_proj.",)


@dataclass(frozen=True)
class AttentionSite:
    name: str  # attn_processors key: "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"
    kind: str  # "cross" or "self"
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


def unet_of(model_or_pipeline):
    """The UNet of a pipeline (``.unet``), or the model itself."""
    unet = getattr(model_or_pipeline, "unet", None)
    if unet is None:
        unet = model_or_pipeline
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise TypeError(
            "model_or_pipeline: expected a diffusers UNet (with attn_processors) or a pipeline with .unet, "
            f"got {type(model_or_pipeline).__name__}"
        )
    return unet


def attention_modules(model) -> dict:
    """``{attn_processors key: Attention module}``."""
    return {name + ".processor": m for name, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "heads")}


def attention_sites(unet) -> List[AttentionSite]:
    modules = attention_modules(unet)
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
                kind="cross" if is_cross else "self",
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
