"""Attention-map capture (kind 5): cross-attention probabilities per text token, for
chosen layers and steps, and a helper that saves one heat-map image per token.

Capturing needs the materialised probabilities, so a layer takes the unfused path only
at the steps where the capture is active; every other call stays fused.  Maps are
averaged over heads and stored on the CPU as ``(B, tokens, h, w)`` float32.  Eager
mode only (it reads the step in Python).

Maps are scoped to one run: a new pipeline call (detected from the timestep rising
again, or after ``reset_steps``) starts from step 0 with no maps, so ``steps=[1]`` on a
second prompt gives that prompt's maps and ``steps=None`` does not grow across calls.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..core.validation import describe
from .base import AttentionCall, EditingMethod


class AttentionMapCapture(EditingMethod):
    """Record cross-attention maps per text token.

    Args:
        target: cross-attention layers (default all of them; e.g. ``"style"``).
        steps: UNet call indices to capture (0 = first call after :func:`apply_method`
            or ``reset_steps``); None captures every step in ``[start_at, end_at]``.
        start_at, end_at, name: see :class:`EditingMethod`.

    After a run, ``maps`` is ``{(step, site): (B, tokens, h, w) tensor}``; see
    :meth:`token_maps` and :func:`save_heatmaps`.
    """

    name = "attention_maps"
    kind = "cross"
    default_target = "all"

    def __init__(self, target=None, *, steps: Optional[Iterable[int]] = None, start_at: float = 0.0,
                 end_at: float = 1.0, name=None):
        super().__init__(target, start_at=start_at, end_at=end_at, name=name)
        if steps is not None:
            try:
                steps = {int(s) for s in steps}
            except (TypeError, ValueError):
                raise TypeError(f"steps: expected None or an iterable of step indices, got {describe(steps)}") from None
        self.steps = steps
        self.maps: Dict[Tuple[int, str], torch.Tensor] = {}

    def on_step(self, step: int, timestep) -> None:
        if step == 0:  # a new run
            self.maps.clear()

    def observing(self, call: AttentionCall) -> bool:
        return self.steps is None or call.step in self.steps

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:
        text = probs[..., : call.k.shape[1]].mean(dim=1)  # (B, N, Lt): head average
        size = call.spatial or _square(text.shape[1])
        self.maps[(call.step, call.site)] = text.transpose(1, 2).reshape(text.shape[0], -1, *size).float().cpu()

    def clear(self) -> None:
        self.maps.clear()

    def token_maps(self, index: int = -1, steps: Optional[Iterable[int]] = None, sites: Optional[Iterable[str]] = None) -> torch.Tensor:
        """``(tokens, h, w)`` maps of batch row ``index`` (default the last: with CFG the
        conditional half), averaged over the captured steps and layers, each upsampled to
        the largest captured resolution."""
        keep = [
            m for (step, site), m in self.maps.items()
            if (steps is None or step in set(steps)) and (sites is None or site in set(sites))
        ]
        if not keep:
            raise ValueError(f"steps/sites: no captured maps match (captured: {sorted({s for s, _ in self.maps}) or 'none'})")
        size = max((m.shape[-2:] for m in keep), key=lambda s: s[0] * s[1])
        rows = [torch.nn.functional.interpolate(m[index][None], size=tuple(size), mode="bilinear", align_corners=False)[0] for m in keep]
        return torch.stack(rows).mean(0)


def _square(n: int) -> tuple:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"attention maps: can't infer the layout of {n} queries (call the UNet with a 4-D sample)")
    return side, side


# A short perceptual colour ramp (black -> purple -> orange -> yellow), interpolated.
_RAMP = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=torch.float32)


def colorize(heat: torch.Tensor) -> torch.Tensor:
    """``(h, w)`` map -> ``(h, w, 3)`` uint8 heat-map colours (normalised to its own range)."""
    heat = heat.float()
    lo, hi = heat.min(), heat.max()
    t = (heat - lo) / (hi - lo).clamp_min(1e-12) * (len(_RAMP) - 1)
    i = t.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (t - i)[..., None]
    return (_RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac).round().to(torch.uint8)


def save_heatmaps(maps: torch.Tensor, out_dir: str, tokens: Optional[List[str]] = None, size: int = 256,
                  image=None, alpha: float = 0.6) -> List[str]:
    """Save one PNG heat map per token; returns the paths.

    Args:
        maps: ``(tokens, h, w)``, e.g. :meth:`AttentionMapCapture.token_maps`.
        out_dir: folder to write ``{i:02d}_{token}.png`` into (created).
        tokens: token strings for the file names, e.g.
            ``tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)``; only these
            many maps are saved.  Default: every map, named by index.
        size: output edge in pixels when no ``image`` is given.
        image: optional PIL image to overlay the maps on (at its size), with ``alpha``.
    """
    from PIL import Image

    if not isinstance(maps, torch.Tensor) or maps.ndim != 3:
        raise ValueError(f"maps: expected a (tokens, h, w) tensor, got {describe(maps)}")
    count = maps.shape[0] if tokens is None else min(len(tokens), maps.shape[0])
    target = image.size[::-1] if image is not None else (size, size)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(count):
        heat = torch.nn.functional.interpolate(maps[i][None, None].float(), size=target, mode="bilinear", align_corners=False)[0, 0]
        picture = Image.fromarray(colorize(heat).numpy())
        if image is not None:
            picture = Image.blend(image.convert("RGB"), picture, alpha)
        word = tokens[i].replace("</w>", "") if tokens is not None else "token"  # CLIP's word-end mark
        label = "".join(c if c.isalnum() else "_" for c in word).strip("_") or "token"
        path = os.path.join(out_dir, f"{i:02d}_{label}.png")
        picture.save(path)
        paths.append(path)
    return paths
