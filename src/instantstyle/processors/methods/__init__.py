"""Attention-editing methods on the injection registry and the fused op.

- :class:`EditingMethod` / :class:`AttentionCall`: the extension interface (``base``,
  on the contributor protocol of ``processors.contributors``).
- :func:`apply_method` / :func:`remove_method`: attach and detach; several methods
  compose into one fused op call per layer (``attach``).
- :class:`StyleAligned`, :class:`VisualStylePrompting`, :class:`AttentionMapCapture`
  (+ :func:`save_heatmaps`): the shipped methods.
"""
from .attach import applied_methods, apply_method, remove_method, reset_steps
from .attend_excite import AttendAndExcite
from .attention_maps import AttentionMapCapture, save_heatmaps
from .base import AttentionCall, EditingMethod, reference_rows
from .style_aligned import StyleAligned, adain
from .visual_style_prompting import VisualStylePrompting

__all__ = [
    "AttendAndExcite",
    "AttentionCall",
    "AttentionMapCapture",
    "EditingMethod",
    "StyleAligned",
    "VisualStylePrompting",
    "adain",
    "applied_methods",
    "apply_method",
    "reference_rows",
    "remove_method",
    "reset_steps",
    "save_heatmaps",
]
