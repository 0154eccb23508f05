"""ComfyUI-style weight types and embeds scaling, on our module maps.

Semantics re-derived from cubiq/ComfyUI_IPAdapter_plus (``IPAdapterPlus.py``,
``ipadapter_execute``: the per-type ``{t: weight}`` dicts; ``CrossAttentionPatch.py``:
the formula types, block kinds, the precise swap and ``embeds_scaling``).  Layer index
``t`` counts the cross-attention transformer *modules* (``...attentions.N``) in forward
order; one value per module applies to all of its transformer blocks.

=========  ==================================================================  =====
arch       modules t = 0 .. L-1                                                L
=========  ==================================================================  =====
SDXL       down_blocks.1.attentions.0-1, down_blocks.2.attentions.0-1 (t0-3),   11
           mid_block.attentions.0 (t4), up_blocks.0.attentions.0-2 (t5-7),
           up_blocks.1.attentions.0-2 (t8-10)
SD1.5/2    down_blocks.0-2.attentions.0-1 (t0-5), mid_block.attentions.0 (t6), 16
           up_blocks.1-3.attentions.0-2 (t7-15)
Flux       transformer_blocks.0-18 (double), single_transformer_blocks.0-37    57
SD3.5      transformer_blocks.0-37 (joint)                                     38
=========  ==================================================================  =====

Block kinds (``weak input``/``weak middle``/``weak output``/``strong middle``): input =
``down_blocks``, middle = ``mid_block``, output = ``up_blocks``.  On Flux input = the
double-stream blocks, output = the single-stream blocks, there is no middle; SD3.5 has
one kind, so those four types are not defined there.  Flux ``style``/``composition``
modules are the cited ``presets`` ``style`` (single 10-37) and ``content`` (single
0-9); SD3.5 has no cited style blocks, so only the formula types exist for it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

WEIGHT_TYPES = (
    "linear", "ease in", "ease out", "ease in-out", "reverse in-out",
    "weak input", "weak middle", "weak output", "strong middle",
    "style transfer", "composition", "strong style transfer",
    "style and composition", "strong style and composition",
    "style transfer precise", "composition precise",
)
EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
PRECISE_TYPES = ("style transfer precise", "composition precise")

_SDXL = (
    [f"down_blocks.{b}.attentions.{i}" for b in (1, 2) for i in (0, 1)]
    + ["mid_block.attentions.0"]
    + [f"up_blocks.{b}.attentions.{i}" for b in (0, 1) for i in (0, 1, 2)]
)
_SD15 = (
    [f"down_blocks.{b}.attentions.{i}" for b in (0, 1, 2) for i in (0, 1)]
    + ["mid_block.attentions.0"]
    + [f"up_blocks.{b}.attentions.{i}" for b in (1, 2, 3) for i in (0, 1, 2)]
)
_FLUX = [f"transformer_blocks.{i}" for i in range(19)] + [f"single_transformer_blocks.{i}" for i in range(38)]
_SD3 = [f"transformer_blocks.{i}" for i in range(38)]
MODULE_MAPS: Dict[str, List[str]] = {"sdxl": _SDXL, "sd15": _SD15, "sd2": _SD15, "flux": _FLUX, "sd3": _SD3}

# {t: factor of w or of wc}: ComfyUI's dicts, by t (UNets only)
_W, _WC = "w", "wc"
_UNET_DICTS = {
    "sdxl": {
        "style transfer": {6: (_W, 1)},
        "composition": {3: (_W, 1)},
        "strong style transfer": {t: (_W, 1) for t in range(11) if t != 3},
        "style and composition": {3: (_WC, 1), 6: (_W, 1)},
        "strong style and composition": {**{t: (_W, 1) for t in range(11)}, 3: (_WC, 1)},
        "style transfer precise": {3: (_WC, 1), 6: (_W, 1)},  # wc = style boost (default w)
        # composition precise: w = composition weight, wc = boost for the rest (default w)
        "composition precise": {**{t: (_WC, 0.1) for t in range(11)}, 3: (_W, 1), 6: (_WC, 1)},
    },
    "sd15": {
        "style transfer": {t: (_W, 1) for t in (0, 1, 2, 3, *range(9, 16))},
        "composition": {4: (_W, 0.25), 5: (_W, 1)},
        "strong style transfer": {t: (_W, 1) for t in range(16) if t not in (4, 5)},
        "style and composition": {**{t: (_W, 1) for t in (0, 1, 2, 3, *range(9, 16))}, 4: (_WC, 0.25), 5: (_WC, 1)},
        "strong style and composition": {**{t: (_W, 1) for t in range(16)}, 4: (_WC, 1), 5: (_WC, 1)},
        "style transfer precise": {**{t: (_W, 1) for t in (0, 1, 2, 3, *range(9, 16))}, 4: (_WC, 0.25), 5: (_WC, 1)},
        "composition precise": {**{t: (_WC, 1) for t in (0, 1, 2, 3, *range(9, 16))}, 6: (_WC, 0.1), 7: (_WC, 0.1),
                                8: (_WC, 0.1), 4: (_W, 0.25), 5: (_W, 1)},
    },
}
#: per arch, the t of the composition modules (the precise swap is at these, or at all others)
_COMPOSITION = {"sdxl": (3,), "sd15": (4, 5)}


def _family(arch: Optional[str]) -> str:
    if arch not in MODULE_MAPS:
        raise ValueError(f"arch: expected one of {', '.join(MODULE_MAPS)} for weight types, got {arch!r}")
    return "sd15" if arch == "sd2" else arch


def check_weight_type(weight_type) -> str:
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type: expected one of {', '.join(repr(w) for w in WEIGHT_TYPES)}, got {weight_type!r}")
    return weight_type


def check_embeds_scaling(mode) -> str:
    if mode not in EMBEDS_SCALING:
        raise ValueError(f"embeds_scaling: expected one of {', '.join(repr(m) for m in EMBEDS_SCALING)}, got {mode!r}")
    return mode


def _kind(module: str, arch: str) -> str:
    if arch == "flux":
        return "input" if module.startswith("transformer_blocks.") else "output"
    return {"down_blocks": "input", "mid_block": "middle", "up_blocks": "output"}.get(module.split(".")[0], "other")


def _dit_dict(arch: str, weight_type: str, modules: Sequence[str]) -> Dict[int, tuple]:
    if arch != "flux":
        raise ValueError(f"weight_type: {weight_type!r} is not defined for {arch} (no cited style blocks); "
                         "use linear, ease in, ease out, ease in-out or reverse in-out")
    single = {t: int(m.split(".")[1]) for t, m in enumerate(modules) if m.startswith("single_transformer_blocks.")}
    style = {t for t, i in single.items() if 10 <= i < 38}
    content = {t for t, i in single.items() if i < 10}
    rest = set(range(len(modules))) - content
    table = {
        "style transfer": {t: (_W, 1) for t in style},
        "composition": {t: (_W, 1) for t in content},
        "strong style transfer": {t: (_W, 1) for t in rest},
        "style and composition": {**{t: (_W, 1) for t in style}, **{t: (_WC, 1) for t in content}},
        "strong style and composition": {**{t: (_W, 1) for t in rest}, **{t: (_WC, 1) for t in content}},
    }
    if weight_type not in table:
        raise ValueError(f"weight_type: {weight_type!r} is not defined for flux; expected one of "
                         f"linear, ease in, ease out, ease in-out, reverse in-out, weak input, weak output, {', '.join(table)}")
    return table[weight_type]


def weights_for(arch, weight_type, weight=1.0, composition_weight=None, modules: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """``{module path: value}`` for every module of ``arch`` (0 where the type leaves it out).

    ``modules``: the model's own module list (a tiny test transformer has fewer blocks);
    default: the full-size map.  ``composition_weight`` defaults to ``weight``.
    """
    family = _family(arch)
    check_weight_type(weight_type)
    modules = list(MODULE_MAPS[family] if modules is None else modules)
    w = float(weight)
    wc = w if composition_weight is None else float(composition_weight)
    L = len(modules)
    half = L / 2
    formulas = {
        "linear": lambda t: w,
        "ease in": lambda t: w * (0.05 + 0.95 * (1 - t / L)),
        "ease out": lambda t: w * (0.05 + 0.95 * (t / L)),
        "ease in-out": lambda t: w * (0.05 + 0.95 * (1 - abs(t - half) / half)),
        "reverse in-out": lambda t: w * (0.05 + 0.95 * (abs(t - half) / half)),
    }
    if weight_type in formulas:
        return {m: formulas[weight_type](t) for t, m in enumerate(modules)}
    weak = {"weak input": ("input",), "weak middle": ("middle",), "weak output": ("output",), "strong middle": ("input", "output")}
    if weight_type in weak:
        if family == "sd3" or (family == "flux" and weight_type in ("weak middle", "strong middle")):
            raise ValueError(f"weight_type: {weight_type!r} is not defined for {family} (no {weak[weight_type][0]} blocks)")
        return {m: 0.2 * w if _kind(m, family) in weak[weight_type] else w for m in modules}
    table = _UNET_DICTS[family][weight_type] if family in _UNET_DICTS else _dit_dict(family, weight_type, modules)
    values = {"w": w, "wc": wc}
    return {m: values[table[t][0]] * table[t][1] if t in table else 0.0 for t, m in enumerate(modules)}


def swapped_modules(arch, weight_type) -> List[str]:
    """Modules whose CFG halves the precise types swap (uncond <- image, cond <- zeros)."""
    if weight_type not in PRECISE_TYPES:
        return []
    family = _family(arch)
    if family not in _COMPOSITION:
        raise ValueError(f"weight_type: {weight_type!r} is defined for SDXL and SD1.5 only, got {family}")
    comp = _COMPOSITION[family]
    chosen = weights_for(family, weight_type, 1.0, 1.0)
    modules = MODULE_MAPS[family]
    if weight_type == "style transfer precise":
        return [modules[t] for t in comp]
    return [m for t, m in enumerate(modules) if t not in comp and chosen[m] != 0]


def module_of(site, arch) -> Optional[str]:
    """The map module that owns ``site`` (an ``AttentionSite``), or None."""
    if _family(arch) in ("flux", "sd3"):
        parts = site.components
        return f"{parts[0]}.{parts[1]}"
    return site.container
