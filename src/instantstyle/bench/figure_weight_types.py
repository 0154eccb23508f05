"""The README's figure of the weight types: what each one adds to a UNet's output.

    python -m instantstyle.bench.figure_weight_types OUT.png [--latent 32]

On the reduced SDXL layout of the UNet bench (its block structure is SDXL's, so every
type's module map applies) with random IP-Adapter weights in every cross-attention layer,
one denoising call per weight type (a CFG batch; the conditional half): the panel shows the IP contribution, the UNet output
with the type minus the output without IP, first three latent channels as RGB, one colour
range for all panels.  Random weights make no picture; what the figure shows is *where*
each type acts (how strong, how spread), which is what the type → modules table says in
numbers.  A real SDXL with a style image, where present, shows the same on real content.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..loaders.controls import set_weight_type
from ..processors.targets.weight_types import WEIGHT_TYPES
from .suite_unet import _UNetBench


def contributions(latent: int = 32) -> dict:
    """``{weight type: (4, latent, latent)}`` IP contribution of each type (float32, CPU)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    # a CFG batch [uncond ; cond], so the precise types' swap acts; the panel is the cond half
    bench = _UNetBench(torch.device("cpu"), torch.float32, reduced=True, latent=latent, batch=2)
    unet = bench.unet
    bench.set_ip(unet, IPAdapterAttnProcessor2_0, None, untargeted=True)  # our loader, every layer
    set_weight_type(unet, "linear", weight=0.0)
    base = bench.step(unet, ip=True)[1]
    out = {}
    for weight_type in WEIGHT_TYPES:
        set_weight_type(unet, weight_type, weight=1.0)
        out[weight_type] = bench.step(unet, ip=True)[1] - base
    return out


def save_figure(maps: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = max(float(m[:3].abs().max()) for m in maps.values()) or 1.0
    cols = 4
    rows = -(-len(maps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.6))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, maps.items()):
        rgb = (m[:3] / (2 * peak) + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(f"{name}\n|max| {float(m.abs().max()):.3f}", fontsize=8)
    fig.suptitle("IP contribution per weight type (reduced SDXL UNet, random IP weights, w = wc = 1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instantstyle.bench.figure_weight_types", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--latent", type=int, default=32, help="latent side (default 32)")
    args = parser.parse_args(argv)
    save_figure(contributions(args.latent), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
