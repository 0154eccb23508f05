"""Canny edge maps for ControlNet, in torch (no OpenCV dependency).

Gaussian blur, Sobel gradients, non-maximum suppression along the gradient direction,
and double-threshold hysteresis, as in ``cv2.Canny``; thresholds are fractions of the
strongest gradient so that any image scale works.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _conv(x: torch.Tensor, kernel) -> torch.Tensor:
    k = torch.tensor(kernel, dtype=x.dtype)
    return F.conv2d(F.pad(x, [k.shape[-1] // 2] * 4, mode="replicate"), k[None, None])


def canny_edges(image, low: float = 0.1, high: float = 0.2, hysteresis_steps: int = 32):
    """A PIL image of white edges on black, the size of ``image``."""
    from PIL import Image

    gray = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None, None]
    blurred = _conv(gray, [[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, 36, 24, 6], [4, 16, 24, 16, 4], [1, 4, 6, 4, 1]]) / 256
    gx = _conv(blurred, [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gy = _conv(blurred, [[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
    mag = torch.hypot(gx, gy)[0, 0]
    # Quantise the gradient direction to 0/45/90/135 degrees; keep local maxima across it.
    angle = (torch.rad2deg(torch.atan2(gy, gx))[0, 0] + 180.0) % 180.0
    sector = ((angle + 22.5) // 45).long() % 4
    padded = F.pad(mag[None, None], [1, 1, 1, 1])[0, 0]
    H, W = mag.shape
    shifts = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s, ((dy1, dx1), (dy2, dx2)) in shifts.items():
        n1 = padded[1 + dy1 : 1 + dy1 + H, 1 + dx1 : 1 + dx1 + W]
        n2 = padded[1 + dy2 : 1 + dy2 + H, 1 + dx2 : 1 + dx2 + W]
        keep |= (sector == s) & (mag >= n1) & (mag >= n2)
    thin = torch.where(keep, mag, torch.zeros_like(mag))
    peak = float(thin.max()) or 1.0
    strong, weak = thin >= high * peak, thin >= low * peak
    # Hysteresis: weak pixels join when 8-connected to strong ones (a bounded flood fill).
    edges = strong
    for _ in range(hysteresis_steps):
        grown = F.max_pool2d(edges[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return Image.fromarray((edges.numpy() * 255).astype(np.uint8)).convert("RGB")
