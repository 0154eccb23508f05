"""Named targets per architecture family: module-path patterns (see ``registry``).

InstantStyle's blocks: SDXL style ``up_blocks.0.attentions.1``, layout
``down_blocks.2.attentions.1``; SD1.5/SD2 (weaker, experimental upstream) style
``up_blocks.1``, layout ``down_blocks.2`` + ``mid_block``.  ``all`` is every site.
Other editing methods add their own presets with :func:`register_preset`.

Transformers (DiT): Flux ``double`` = the 19 double-stream ``transformer_blocks``,
``single`` = the 38 ``single_transformer_blocks``; SD3 has joint blocks only, so
``all`` is its one preset (no published block analysis to cite for SD3.5 yet).

Wan family (Wan 2.1 I2V/FLF2V, SkyReels-V2, ChronoEdit, Wan-Animate): ``all`` only.  No
publication or measurement we can cite yet says which blocks' image branch carries
appearance vs layout, so there are no early/late presets; per-block control goes through
patterns (``"blocks.3"``, ``"blocks.1*"``), ``{"blocks": {i: w}}`` dicts, or
``set_image_scale``'s per-block list/dict.
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
        # B-LoRA (Frenkel et al., "Implicit Style-Content Separation using B-LoRA", ECCV 2024):
        # LoRAs trained only in these two blocks of SDXL separate content (attentions.0) from
        # style (attentions.1); `instantstyle train-lora` trains them, `load_b_lora` loads one.
        "b-lora-content": ("up_blocks.0.attentions.0",),
        "b-lora-style": ("up_blocks.0.attentions.1",),
        "b-lora": ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1"),
    },
    "sd15": {
        "style": ("up_blocks.1",),
        "layout": ("down_blocks.2", "mid_block"),
        "style+layout": ("up_blocks.1", "down_blocks.2", "mid_block"),
        "all": ALL,
    },
    "flux": {
        "all": ALL,
        "double": ("transformer_blocks",),
        "single": ("single_transformer_blocks",),
        # SplitFlux (Yang et al., arXiv 2511.15258, CVPR 2026), abstract: "Early single
        # stream blocks mainly control content, whereas later blocks govern style", and
        # double-stream blocks barely matter.  The split point, blocks 20-29 (content) vs
        # 30-57 (style) counted 1-based over all 57 blocks, i.e. single blocks 0-9 vs
        # 10-37, is from a secondary summary of the paper's prompt-replacement study
        # (themoonlight.io review); only the InstantX format has weights there.
        "content": tuple(f"single_transformer_blocks.{i}" for i in range(0, 10)),
        "style": tuple(f"single_transformer_blocks.{i}" for i in range(10, 38)),
    },
    "sd3": {"all": ALL, "joint": ("transformer_blocks",)},
    "wan": {"all": ALL},  # no cited block analysis yet: see the module doc
    None: {"all": ALL},  # unknown architectures: "all" plus explicit patterns
}


def register_preset(family, name: str, patterns) -> None:
    """Add (or replace) a preset, e.g. ``register_preset("sdxl", "vsp", ["up_blocks.1"])``."""
    PRESETS.setdefault(family, {"all": ALL})[name] = tuple(patterns)


def presets_for(family) -> Dict[str, Tuple[str, ...]]:
    return PRESETS.get(family, PRESETS[None])
