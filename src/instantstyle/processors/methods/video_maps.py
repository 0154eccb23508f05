"""Cross-attention maps per frame on Wan-family video transformers, and heat maps per
frame (an animated GIF or a PNG strip).

A Wan layer's queries are the video's latent tokens, frame major: ``N = F' * H' * W'``
(patch ``(1, 2, 2)``: ``F'`` latent frames, ``H' = H / 2``, ``W' = W / 2`` of the latent
size).  :class:`VideoAttentionMaps` records the text softmax of each chosen ``attn2``
(the first softmax of the one op call; the layer runs the unfused torch path only at
captured steps) as ``(B, tokens, F', H', W')``, head-averaged; :func:`frame_maps` does
the same reshape for any ``(B, H, N, L)`` or ``(B, N, L)`` probabilities.

Only the text maps: the image stream's softmax is not materialised by the op (keeping
it would need the op to return a second probability tensor).  Steps count transformer
calls: Wan's pipelines call the model twice per step under CFG (cond, then uncond).
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ..core.validation import describe
from ..wan.video_grid import track_grid, untrack_grid
from .attention_maps import AttentionMapCapture, colorize
from .base import AttentionCall


def frame_maps(probs: torch.Tensor, grid) -> torch.Tensor:
    """``(B, H, N, L)`` -> ``(B, H, L, F, h, w)`` (or ``(B, N, L)`` -> ``(B, L, F, h, w)``),
    with ``grid = (F, h, w)`` and ``N = F * h * w`` frame major."""
    if not isinstance(probs, torch.Tensor) or probs.ndim not in (3, 4):
        raise ValueError(f"probs: expected a (B, H, N, L) or (B, N, L) tensor, got {describe(probs)}")
    f, h, w = grid
    if f * h * w != probs.shape[-2]:
        raise ValueError(f"grid: expected F * h * w = {probs.shape[-2]} (the queries), got {tuple(grid)}")
    return probs.transpose(-1, -2).unflatten(-1, (f, h, w))


class VideoAttentionMaps(AttentionMapCapture):
    """Record Wan cross-attention maps per frame, per text token.

    Args:
        target: cross-attention layers (``blocks.N.attn2``; default all).
        tokens: text token indices to keep (default all 512: at 480x832, 81 frames, one
            map is 512 x 32,760 floats per layer and step).
        steps, differentiable, start_at, end_at, name: see :class:`AttentionMapCapture`.

    After a run, ``maps`` is ``{(step, site): (B, tokens, F', H', W')}``; see
    :meth:`video_maps` and :func:`save_frame_heatmaps`.
    """

    name = "video_attention_maps"

    def __init__(self, target=None, *, tokens: Iterable[int] | None = None, **kwargs):
        super().__init__(target, **kwargs)
        if tokens is not None:
            try:
                tokens = [int(t) for t in tokens]
            except (TypeError, ValueError):
                raise TypeError(f"tokens: expected None or an iterable of token indices, got {describe(tokens)}") from None
        self.tokens = tokens
        self.grid = None  # (F', H', W') of the current call, written by the model's GridHook

    def patch_modules(self, model) -> None:
        track_grid(model, self)

    def unpatch_modules(self, model) -> None:
        untrack_grid(model, self)

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:
        if self.grid is None:
            raise ValueError("hidden_states: expected the Wan transformer called with a 5-D (B, C, F, H, W) latent, got none")
        text = probs[..., : call.k.shape[1]]
        if self.tokens is not None:
            text = text[..., self.tokens]
        if not self.differentiable:
            text = text.detach()
        maps = frame_maps(text.mean(dim=1), self.grid)  # (B, tokens, F, h, w): head average
        self.maps[(call.step, call.site)] = maps if self.differentiable else maps.float().cpu()
        self.heads[(call.step, call.site)] = text.shape[1]

    def video_maps(self, index: int = -1, steps: Iterable[int] | None = None, sites: Iterable[str] | None = None) -> torch.Tensor:
        """``(tokens, F', H', W')`` maps of batch row ``index``, averaged over the captured
        steps and layers (every Wan layer has the same grid)."""
        keep = [m[index] for (step, site), m in self.maps.items()
                if (steps is None or step in set(steps)) and (sites is None or site in set(sites))]
        if not keep:
            raise ValueError(f"steps/sites: no captured maps match (captured: {sorted({s for s, _ in self.maps}) or 'none'})")
        return torch.stack(keep).mean(0)


def save_frame_heatmaps(maps: torch.Tensor, path: str, size: int = 128, duration_ms: int = 125) -> str:
    """Save one token's ``(F, h, w)`` maps as heat maps per frame: an animated GIF
    (``path`` ending ``.gif``) or a PNG strip of the frames side by side (``.png``).
    One colour range over the whole video, so frames compare.  Returns ``path``."""
    from PIL import Image

    if not isinstance(maps, torch.Tensor) or maps.ndim != 3:
        raise ValueError(f"maps: expected a (frames, h, w) tensor, got {describe(maps)}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".gif", ".png"):
        raise ValueError(f"path: expected a name ending .gif or .png, got {path!r}")
    f, h, w = maps.shape
    width = max(1, round(size * w / h))
    heat = torch.nn.functional.interpolate(maps[:, None].float(), size=(size, width), mode="bilinear", align_corners=False)[:, 0]
    frames = [Image.fromarray(c.numpy()) for c in colorize(heat)]  # colorize: one range over every frame
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if ext == ".gif":
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    else:
        strip = Image.new("RGB", (width * f, size))
        for i, frame in enumerate(frames):
            strip.paste(frame, (i * width, 0))
        strip.save(path)
    return path
