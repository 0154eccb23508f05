"""The kernel-shape catalogue: which attention calls the benchmark times.

Every shape is one attn2 (cross-attention) call as it happens inside a real UNet:

* SDXL at 1024x1024: 4096 queries x 10 heads (64x64 latent layers, 640 ch) and
  1024 queries x 20 heads (32x32 layers, 1280 ch), head dim 64, 77 text tokens.
* SD1.5 at 512x512: 8 heads with head dims 40 / 80 / 160 (4096 / 1024 / 256 queries).
* Variations on the main SDXL shape: long prompts (231 text tokens), IP-Adapter Plus
  (16 tokens), Full-face (257 tokens), two adapters at once, batch 1 / 2 / 8.

``B`` counts classifier-free guidance: batch 2 is ONE image with CFG.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import List, Sequence, Tuple

#: Issue 2's target: SDXL 1024^2, 64x64 layer, CFG batch 2, one 4-token stream.
TARGET_SHAPE_NAME = "sdxl-4096x10"


@dataclass(frozen=True)
class Shape:
    """One decoupled-attention call: q (B, N, H, D), text k/v (B, Lt, H, D), IP k/v (B, L_i, H, D)."""

    name: str
    B: int
    N: int
    H: int
    D: int
    Lt: int = 77
    ip_tokens: Tuple[int, ...] = (4,)
    note: str = ""

    @property
    def ip_total(self) -> int:
        return sum(self.ip_tokens)

    def describe(self) -> str:
        ip = "+".join(str(t) for t in self.ip_tokens) or "0"
        return f"B={self.B} N={self.N} H={self.H} D={self.D} Lt={self.Lt} ip={ip}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ip_tokens"] = list(self.ip_tokens)
        return d


_SDXL = Shape(TARGET_SHAPE_NAME, B=2, N=4096, H=10, D=64, note="SDXL 1024^2, 64x64 layers (issue 2 target)")

FULL_SHAPES: List[Shape] = [
    _SDXL,
    Shape("sdxl-1024x20", B=2, N=1024, H=20, D=64, note="SDXL 1024^2, 32x32 layers"),
    Shape("sd15-4096x8-d40", B=2, N=4096, H=8, D=40, note="SD1.5 512^2, 320 ch"),
    Shape("sd15-1024x8-d80", B=2, N=1024, H=8, D=80, note="SD1.5 512^2, 640 ch"),
    Shape("sd15-256x8-d160", B=2, N=256, H=8, D=160, note="SD1.5 512^2, 1280 ch"),
    replace(_SDXL, name="sdxl-4096x10-lt231", Lt=231, note="long prompt (3 chunks of 77)"),
    replace(_SDXL, name="sdxl-4096x10-plus16", ip_tokens=(16,), note="IP-Adapter Plus"),
    replace(_SDXL, name="sdxl-4096x10-face257", ip_tokens=(257,), note="IP-Adapter Full-face"),
    replace(_SDXL, name="sdxl-4096x10-two-adapters", ip_tokens=(4, 16), note="two adapters (base + Plus)"),
    replace(_SDXL, name="sdxl-4096x10-b1", B=1, note="batch 1 (no CFG)"),
    replace(_SDXL, name="sdxl-4096x10-b8", B=8, note="batch 8 (4 images with CFG)"),
]

#: ``--quick``: the issue-2 target shape plus small ones that still exercise odd head
#: dims and two streams.  Sized to keep ``instantstyle bench --quick`` well under
#: two minutes on two CPU cores.
QUICK_SHAPES: List[Shape] = [
    _SDXL,
    Shape("sdxl-1024x20", B=2, N=1024, H=20, D=64, note="SDXL 1024^2, 32x32 layers"),
    Shape("sd15-256x8-d40-two-adapters", B=2, N=256, H=8, D=40, ip_tokens=(4, 16),
          note="small: SD1.5 head dim 40, two adapters"),
]


def kernel_shapes(quick: bool, only: Sequence[str] = ()) -> List[Shape]:
    """The catalogue for this run; ``only`` filters by name (exact name, else substring)."""
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    names = all_shape_names()
    return [s for s in shapes if not only or any(s.name == o if o in names else o in s.name for o in only)]


def all_shape_names() -> List[str]:
    seen = []
    for s in FULL_SHAPES + QUICK_SHAPES:
        if s.name not in seen:
            seen.append(s.name)
    return seen
