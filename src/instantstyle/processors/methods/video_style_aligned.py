"""StyleAligned on video self-attention (Wan family ``blocks.N.attn1``): a shared
reference in every self-attention softmax, ONE op call per layer.

Two references (``reference=``):

- ``"first_video"``: :class:`~.style_aligned.StyleAligned` as on images, each video of
  the batch shares self-attention with the batch's first video (AdaIN of q/k toward
  its statistics over all its tokens; its keys/values appended to every row's
  softmax).  Wan's pipelines call the transformer once per CFG half, so ``cfg``
  defaults to False here (row 0 of each call is the reference).
- ``"first_frame"``: each video shares with its own first latent frame: AdaIN per
  frame (each frame's q/k statistics, over its ``H' * W'`` tokens, moved to frame 0's;
  frame 0 maps to itself) and frame 0's keys/values appended to the softmax of every
  token of the video.

RoPE (see :mod:`instantstyle.processors.wan.self_attention`): AdaIN acts before RoPE,
the appended keys after it, so a reference token keeps the rotation of its own
position: a reference video's token (f, y, x) as the row's own token there, frame 0's
tokens their frame-0 positions.
"""
from __future__ import annotations

import torch

from ..wan.video_grid import track_grid, untrack_grid
from .style_aligned import EPS, StyleAligned

REFERENCES = ("first_video", "first_frame")


def frame_adain(x: torch.Tensor, frames: int) -> torch.Tensor:
    """AdaIN of each frame of ``x`` ``(B, F*hw, H, D)`` toward frame 0 of the same row;
    statistics over a frame's tokens (unbiased variance, as :func:`~.style_aligned.adain`)."""
    xf = x.unflatten(1, (frames, -1))
    mean = xf.mean(dim=2, keepdim=True)
    std = (xf.var(dim=2, keepdim=True) + EPS).sqrt()
    return ((xf - mean) / std * std[:, :1] + mean[:, :1]).flatten(1, 2)


class VideoStyleAligned(StyleAligned):
    """StyleAligned with a reference video or each video's first frame.

    Args:
        reference: ``"first_video"`` (default) or ``"first_frame"``.
        cfg: True only for a batch ``[uncond; cond]`` in one call (Wan's pipelines make
            two calls: default False).
        keys_scale: ``"first_video"`` only (a per-row logit scale; every row is its own
            frame-0 reference's row in ``"first_frame"``).
        other arguments: see :class:`~.style_aligned.StyleAligned`.
    """

    name = "video_style_aligned"

    def __init__(self, target=None, *, reference: str = "first_video", cfg: bool = False, **kwargs):
        super().__init__(target, cfg=cfg, **kwargs)
        if reference not in REFERENCES:
            raise ValueError(f"reference: expected one of {', '.join(REFERENCES)}, got {reference!r}")
        if reference == "first_frame" and self.keys_scale != 1.0:
            raise ValueError(f"keys_scale: expected 1 with reference='first_frame' (no row is a pure reference), got {self.keys_scale}")
        self.reference = reference
        self.grid = None  # (F', H', W') of the current call, written by the model's GridHook

    def patch_modules(self, model) -> None:
        super().patch_modules(model)
        track_grid(model, self)

    def unpatch_modules(self, model) -> None:
        super().unpatch_modules(model)
        untrack_grid(model, self)

    def _frames(self, call) -> int:
        if self.grid is None or self.grid[0] * self.grid[1] * self.grid[2] != call.q.shape[1]:
            raise ValueError(f"hidden_states: reference='first_frame' needs the Wan transformer's 5-D latent for "
                             f"{call.q.shape[1]} tokens, got grid {self.grid}")
        return self.grid[0]

    def transform_qk(self, call):
        if self.reference == "first_video":
            return super().transform_qk(call)
        f = self._frames(call)
        return (frame_adain(call.q, f) if self.adain_queries else call.q), (frame_adain(call.k, f) if self.adain_keys else call.k)

    def replace_kv(self, call):
        if self.reference == "first_video":
            return super().replace_kv(call)
        return call.k, (frame_adain(call.v, self._frames(call)) if self.adain_values else call.v)

    def joint_kv(self, call):
        if self.reference == "first_video":
            return super().joint_kv(call)
        first = call.k.shape[1] // self._frames(call)  # frame 0's tokens, with their own RoPE
        k, v = call.k[:, :first], call.v[:, :first]
        bias = None
        if self.score_shift != 0.0:
            dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
            bias = torch.full(k.shape[:2], self.score_shift, dtype=dtype, device=k.device)
        return k, v, bias
