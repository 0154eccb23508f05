"""Attention-map capture (kind 5): cross-attention probabilities per text token, for
chosen layers and steps, and a helper that saves one heat-map image per token.

Capturing needs the materialised probabilities, so a layer takes the unfused path only
at the steps where the capture is active; every other call stays fused.  Maps are
averaged over heads and stored on the CPU as ``(B, tokens, h, w)`` float32.  Eager
mode only (it reads the step in Python).

Maps are scoped to one run: a new pipeline call (detected from the timestep rising
again, or after ``reset_steps``) starts from step 0 with no maps, so ``steps=[1]`` on a
second prompt gives that prompt's maps and ``steps=None`` does not grow across calls.

**Differentiable mode** (``differentiable=True``, for attention guidance such as
:mod:`.attend_excite`): the maps stay on the model's device, in the probabilities' dtype
(fp32, fp64 for fp64 inputs), and in the autograd graph, so a loss on them reaches
``q``/``k`` and through them the latents.  This is exact because an observed layer runs
the unfused torch path (``torch_decoupled_attention(keep_probs=True)``): the text
probabilities are ``P = softmax(S)`` built by autograd-visible ops, the output uses that
very ``P`` (``P @ V``) and the IP streams add their own softmaxes on top.  Autograd then
sums both upstream gradients into ``dP = dP_out + G`` and the softmax backward gives
``dS = P * (dP - rowsum(P * dP))``, i.e. the op's ``dS`` plus exactly
``P * (G - rowsum(P * G))`` (training-facts: attention guidance); the unobserved layers
keep the fused op with its registered backward.  Without it, maps are detached (no
graph is kept alive by a stored map).
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ..core.validation import describe
from .base import AttentionCall, EditingMethod


class AttentionMapCapture(EditingMethod):
    """Record cross-attention maps per text token.

    Args:
        target: cross-attention layers (default all of them; e.g. ``"style"``).
        steps: UNet call indices to capture (0 = first call after :func:`apply_method`
            or ``reset_steps``); None captures every step in ``[start_at, end_at]``.
        differentiable: keep the maps in the autograd graph, on the device (see the
            module doc); default False: detached float32 copies on the CPU.
        start_at, end_at, name: see :class:`EditingMethod`.

    After a run, ``maps`` is ``{(step, site): (B, tokens, h, w) tensor}``; see
    :meth:`token_maps` and :func:`save_heatmaps`.
    """

    name = "attention_maps"
    kind = "cross"
    default_target = "all"

    def __init__(self, target=None, *, steps: Iterable[int] | None = None, differentiable: bool = False,
                 start_at: float = 0.0, end_at: float = 1.0, name=None):
        super().__init__(target, start_at=start_at, end_at=end_at, name=name)
        if not isinstance(differentiable, bool):
            raise TypeError(f"differentiable: expected True or False, got {describe(differentiable)}")
        self.differentiable = differentiable
        if steps is not None:
            try:
                steps = {int(s) for s in steps}
            except (TypeError, ValueError):
                raise TypeError(f"steps: expected None or an iterable of step indices, got {describe(steps)}") from None
        self.steps = steps
        self.maps: dict[tuple[int, str], torch.Tensor] = {}
        self.heads: dict[tuple[int, str], int] = {}  # heads averaged into each map (weights for a mean over layers)

    def on_step(self, step: int, timestep) -> None:
        if step == 0:  # a new run
            self.clear()

    def observing(self, call: AttentionCall) -> bool:
        return self.steps is None or call.step in self.steps

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:
        text = probs[..., : call.k.shape[1]]
        if not self.differentiable:
            text = text.detach()  # a stored map must not keep the step's graph alive
        size = call.spatial or _square(text.shape[2])
        maps = text.mean(dim=1).transpose(1, 2).reshape(text.shape[0], -1, *size)  # (B, Lt, h, w): head average
        self.maps[(call.step, call.site)] = maps if self.differentiable else maps.float().cpu()
        self.heads[(call.step, call.site)] = text.shape[1]

    def clear(self) -> None:
        self.maps.clear()
        self.heads.clear()

    def token_maps(self, index: int = -1, steps: Iterable[int] | None = None, sites: Iterable[str] | None = None) -> torch.Tensor:
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
    side = round(n ** 0.5)
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


def save_heatmaps(maps: torch.Tensor, out_dir: str, tokens: list[str] | None = None, size: int = 256,
                  image=None, alpha: float = 0.6) -> list[str]:
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
