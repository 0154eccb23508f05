"""Visual Style Prompting (Jeong et al. 2024, naver-ai/Visual-Style-Prompting): in the
late self-attention layers every image keeps its own queries and takes the keys and
values of the reference image (kind 3, K/V replacement).

The reference is the first row of each CFG half, as in StyleAligned, so the
unconditional half references the unconditional reference.  Default blocks: SDXL
``up_blocks.1`` (the paper's choice); SD1.5 ``up_blocks.2`` and ``up_blocks.3``
(the same late decoder layers).  The ``"vsp"`` preset names them.
"""
from __future__ import annotations

from ..core.validation import describe
from ..targets.presets import register_preset
from .base import EditingMethod, reference_rows

register_preset("sdxl", "vsp", ["up_blocks.1"])
register_preset("sd15", "vsp", ["up_blocks.2", "up_blocks.3"])


class VisualStylePrompting(EditingMethod):
    """Self-attention K/V swapped in from the reference image of each CFG half.

    Args:
        target: self-attention layers (default the ``"vsp"`` preset).
        cfg: True when the batch is ``[unconditional; conditional]``.
        start_at, end_at, name: see :class:`EditingMethod`.
    """

    name = "visual_style_prompting"
    kind = "self"
    default_target = "vsp"

    def __init__(self, target=None, *, cfg: bool = True, start_at: float = 0.0, end_at: float = 1.0, name=None):
        super().__init__(target, start_at=start_at, end_at=end_at, name=name)
        if not isinstance(cfg, bool):
            raise TypeError(f"cfg: expected True or False, got {describe(cfg)}")
        self.halves = 2 if cfg else 1

    def replace_kv(self, call):
        rows = reference_rows(call.batch, self.halves, "VisualStylePrompting batch", call.k.device)
        return call.k[rows], call.v[rows]
