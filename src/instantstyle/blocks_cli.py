"""List a UNet's attention modules and what is injected where.

Builds the full-size architecture on the meta device from built-in configs (no
download, no memory) and shows, for every attention module: self- or cross-attention,
heads x head_dim, query count at the default resolution (SDXL 1024 px, SD1.5 512 px,
SD2 768 px) and what the preset injects there, plus the IP parameters it saves.

Example:

    instantstyle blocks --arch sdxl --preset style
    instantstyle blocks --arch sd15 --preset style+layout --json
    instantstyle blocks --arch sdxl --target up_blocks.0.attentions.1 --cross-only
    instantstyle blocks --arch flux --preset style          # InstantX FLUX.1-dev layout
    instantstyle blocks --arch flux --preset double --format xlabs
    instantstyle blocks --arch sd3 --preset all
    instantstyle blocks --arch wan --preset all --cross-only   # Wan 2.1 I2V 14B
    instantstyle blocks --arch wan --target blocks.1*           # what set_image_scale(target=...) reaches

Transformers (flux, sd3) list joint/single layers; "queries" is the joint sequence
(image + text tokens) at 1024 px.  Wan (2.1 I2V 14B: 40 blocks, 40 heads x 128) lists
each block's self- (attn1) and cross-attention (attn2, with the native image branch);
"queries" is the video tokens at 480x832, 81 frames (32,760), and the preset/target is
where ``set_image_scale(..., target=...)`` acts.
"""
from __future__ import annotations

import argparse
import json
import sys

from .processors.targets.architectures import CONFIGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=sorted(CONFIGS), default="sdxl", help="architecture (default: sdxl)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", default=None, help="preset to inject IP-Adapter into (style, layout, style+layout, all)")
    group.add_argument("--target", nargs="+", default=None, metavar="PATTERN", help="module-path patterns instead of a preset")
    parser.add_argument("--cross-only", action="store_true", help="list cross-attention modules only")
    parser.add_argument("--format", choices=("xlabs", "instantx"), default=None,
                        help="flux: IP-Adapter layout the parameter counts assume (default instantx: double + single blocks)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")


def describe_blocks(arch: str, target=None, cross_only: bool = False, fmt=None):
    """``(rows, summary)`` for ``arch`` with IP-Adapter injected at ``target`` (None: nothing)."""
    from .loaders import ip_param_counts
    from .loaders.flux import capable_sites
    from .loaders.transformer import transformer_ip_param_counts
    from .processors.targets.architectures import TRANSFORMER_ARCHS, build_meta_unet
    from .processors.targets.registry import registry_of

    unet = build_meta_unet(arch)
    registry = registry_of(unet, arch)
    if arch == "wan":
        return _describe_wan(unet, registry, target, cross_only)
    summary = {"arch": arch, "target": target}
    planned = {}
    if target is not None:
        planned["ip_adapter[0]"] = registry.resolve(target, "cross")
        capable = len(registry.candidates("cross"))
        if arch in TRANSFORMER_ARCHS:
            fmt = "instantx-sd3" if arch == "sd3" else (fmt or "instantx")
            if fmt != "instantx-sd3":  # XLabs has weights in the 19 double-stream layers only, as the loader
                planned["ip_adapter[0]"] = _capable(planned["ip_adapter[0]"], registry.sites, fmt, target)
                capable = len(capable_sites(fmt, registry.sites))
            counts = transformer_ip_param_counts(unet, target, fmt)
            summary["format"] = fmt
        else:
            counts = ip_param_counts(unet, target)
        summary.update(
            ip_params=counts["held"],
            ip_params_all_layers=counts["all_layers"],
            ip_layers=len(planned["ip_adapter[0]"]),
            ip_layers_all=capable,
        )
    rows = registry.table(planned)
    if cross_only:
        rows = [r for r in rows if r["kind"] == "cross"]
    return rows, summary


def _describe_wan(model, registry, target, cross_only: bool):
    """Wan: every attn2 holds the native image branch; ``target`` shows where set_image_scale acts."""
    branch = {s.name: 1.0 for s in registry.sites if getattr(s.module, "add_k_proj", None) is not None}
    planned = {"image_branch": branch}
    summary = {"arch": "wan", "target": target}
    if target is not None:
        planned["set_image_scale"] = {s: w for s, w in registry.resolve(target, "cross").items() if s in branch}
        first = next(s.module for s in registry.sites if s.name in branch)
        per_layer = sum(p.numel() for name, p in first.named_parameters() if name.startswith(("add_k_proj", "add_v_proj", "norm_added_k")))
        summary.update(image_layers=len(planned["set_image_scale"]), image_layers_all=len(branch),
                       image_params=per_layer * len(planned["set_image_scale"]), image_params_all=per_layer * len(branch))
    rows = registry.table(planned)
    if cross_only:
        rows = [r for r in rows if r["kind"] == "cross"]
    return rows, summary


def _capable(weights: dict, sites, fmt: str, target) -> dict:
    """The loader's rule: ``"all"`` means the layers the format has weights for; a target
    naming others is an error."""
    from .loaders.flux import capable_sites

    names = {s.name for s in capable_sites(fmt, sites)}
    outside = [s for s in weights if s not in names]
    if outside and target != "all":
        raise ValueError(f"target: a {fmt} checkpoint has weights for the double-stream blocks (transformer_blocks.N) only; "
                         f"{target!r} also names {len(outside)} single-stream layers, e.g. {outside[0]}")
    return {s: w for s, w in weights.items() if s in names}


def _table(rows, summary) -> str:
    width = max(len(r["name"]) for r in rows) if rows else 10
    lines = [f"{'name':<{width}}  kind   heads x dim  queries  injected"]
    for r in rows:
        shape = f"{r['heads']} x {r['head_dim']}"
        lines.append(f"{r['name']:<{width}}  {r['kind']:<5}  {shape:>11}  {r['queries'] or '-':>7}  {', '.join(r['injected']) or '-'}")
    if "image_layers" in summary:
        lines.append(
            f"\nwan target {summary['target']!r}: set_image_scale acts on {summary['image_layers']} of "
            f"{summary['image_layers_all']} cross-attention layers with an image branch (add_k_proj, add_v_proj, "
            f"norm_added_k: {summary['image_params']:,} of {summary['image_params_all']:,} parameters); "
            "a block at scale 0 skips its image branch entirely"
        )
    if "ip_params" in summary:
        fp16 = 2 * (summary["ip_params_all_layers"] - summary["ip_params"])
        lines.append(
            f"\n{summary['arch']} target {summary['target']!r}: IP weights in {summary['ip_layers']} of "
            f"{summary['ip_layers_all']} {'attention' if 'format' in summary else 'cross-attention'} layers, {summary['ip_params']:,} of "
            f"{summary['ip_params_all_layers']:,} parameters ({fp16 / 2**20:.1f} MiB saved in fp16)"
        )
    return "\n".join(lines)


def run(args) -> int:
    target = args.target if args.target else args.preset
    try:
        rows, summary = describe_blocks(args.arch, target, args.cross_only, getattr(args, "format", None))
    except (ValueError, TypeError) as exc:
        print(f"instantstyle: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else _table(rows, summary))
    return 0
