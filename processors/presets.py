"""Named targets per architecture family: module-path patterns (see ``registry``).

InstantStyle's blocks: SDXL style ``up_blocks.0.attentions.1``, layout
``down_blocks.2.attentions.1``; SD1.5/SD2 (weaker, experimental upstream) style
``up_blocks.1``, layout ``down_blocks.2`` + ``mid_block``.  ``all`` is every site.
Other editing methods add their own presets with :func:`register_preset`.
"""
from __future__ import annotations

from typing import Dict, Tuple

ALL = ("*",)

PRESETS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "sdxl": {
        "style": ("up_blocks.0.attentions.1",),
        "layout": ("down_blocks.2.attentions.1",),
        "style+layout": ("up_blocks.0.attentions.1", "down_blocks.2.attentions.1"),
        "all": ALL,
    },
    "sd15": {
        "style": ("up_blocks.1",),
        "layout": ("down_blocks.2", "mid_block"),
        "style+layout": ("up_blocks.1", "down_blocks.2", "mid_block"),
        "all": ALL,
    },
    None: {"all": ALL},  # unknown architectures: "all" plus explicit patterns
}


def register_preset(family, name: str, patterns) -> None:
    """Add (or replace) a preset, e.g. ``register_preset("sdxl", "vsp", ["up_blocks.1"])``."""
    PRESETS.setdefault(family, {"all": ALL})[name] = tuple(patterns)


def presets_for(family) -> Dict[str, Tuple[str, ...]]:
    return PRESETS.get(family, PRESETS[None])
