"""Weight types vs tables written by hand from ComfyUI_IPAdapter_plus' formulas and dicts."""
import pytest

from instantstyle.processors.targets.architectures import build_meta_unet
from instantstyle.processors.targets.registry import registry_of
from instantstyle.processors.targets.weight_types import (
    EMBEDS_SCALING,
    MODULE_MAPS,
    WEIGHT_TYPES,
    module_of,
    swapped_modules,
    weights_for,
)

W, WC = 0.7, 1.3


def by_hand(arch, kind, w=W, wc=WC):
    """{t: value} written out per type (L=11 SDXL, 16 SD1.5); missing t are 0."""
    L = 11 if arch == "sdxl" else 16
    mid = 4 if arch == "sdxl" else 6
    block = lambda t: "input" if t < mid else "middle" if t == mid else "output"  # noqa: E731
    ts = range(L)
    if kind == "linear":
        return {t: w for t in ts}
    if kind == "ease in":
        return {t: w * (0.05 + 0.95 * (1 - t / L)) for t in ts}
    if kind == "ease out":
        return {t: w * (0.05 + 0.95 * t / L) for t in ts}
    if kind == "ease in-out":
        return {t: w * (0.05 + 0.95 * (1 - abs(t - L / 2) / (L / 2))) for t in ts}
    if kind == "reverse in-out":
        return {t: w * (0.05 + 0.95 * abs(t - L / 2) / (L / 2)) for t in ts}
    weak = {"weak input": {"input"}, "weak middle": {"middle"}, "weak output": {"output"}, "strong middle": {"input", "output"}}
    if kind in weak:
        return {t: 0.2 * w if block(t) in weak[kind] else w for t in ts}
    style = [6] if arch == "sdxl" else [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
    comp = [3] if arch == "sdxl" else [4, 5]
    if kind == "style transfer":
        return {t: w for t in style}
    if kind == "composition":
        return {3: w} if arch == "sdxl" else {4: 0.25 * w, 5: w}
    if kind == "strong style transfer":
        return {t: w for t in ts if t not in comp}
    if kind in ("style and composition", "style transfer precise"):
        return {**{t: w for t in style}, **({3: wc} if arch == "sdxl" else {4: 0.25 * wc, 5: wc})}
    if kind == "strong style and composition":
        return {**{t: w for t in ts}, **{t: wc for t in comp}}
    if kind == "composition precise":  # w: composition weight, wc: the boost elsewhere
        if arch == "sdxl":
            return {**{t: 0.1 * wc for t in ts}, 3: w, 6: wc}
        return {**{t: wc for t in style}, 6: 0.1 * wc, 7: 0.1 * wc, 8: 0.1 * wc, 4: 0.25 * w, 5: w}
    raise AssertionError(kind)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
@pytest.mark.parametrize("kind", WEIGHT_TYPES)
def test_every_type_matches_the_formula(arch, kind):
    got = weights_for(arch, kind, W, WC)
    want = by_hand(arch, kind)
    modules = MODULE_MAPS[arch]
    assert list(got) == modules
    for t, m in enumerate(modules):
        assert got[m] == pytest.approx(want.get(t, 0.0), abs=1e-12), (t, m)


def test_module_maps_match_the_real_unets_including_the_mid_block():
    for arch, L, mid in (("sdxl", 11, 4), ("sd15", 16, 6)):
        registry = registry_of(build_meta_unet(arch))
        containers = list(dict.fromkeys(module_of(s, arch) for s in registry.candidates("cross")))
        # attn_processors lists down, up, then mid; forward order puts mid between them
        forward = [c for c in containers if c.startswith("down")] + [c for c in containers if c.startswith("mid")] + \
                  [c for c in containers if c.startswith("up")]
        assert forward == MODULE_MAPS[arch] and len(forward) == L
        assert MODULE_MAPS[arch][mid] == "mid_block.attentions.0"
    assert MODULE_MAPS["sdxl"][6] == "up_blocks.0.attentions.1"  # InstantStyle's style block
    assert MODULE_MAPS["sdxl"][3] == "down_blocks.2.attentions.1"  # its layout block


def test_flux_types_on_block_maps():
    registry = registry_of(build_meta_unet("flux"))
    modules = list(dict.fromkeys(module_of(s, "flux") for s in registry.candidates("cross")))
    assert sorted(modules) == sorted(MODULE_MAPS["flux"])
    style = weights_for("flux", "style transfer", W)
    assert {m for m, v in style.items() if v} == {f"single_transformer_blocks.{i}" for i in range(10, 38)}
    comp = weights_for("flux", "style and composition", W, WC)
    assert all(comp[f"single_transformer_blocks.{i}"] == WC for i in range(10))
    assert all(comp[f"transformer_blocks.{i}"] == 0 for i in range(19))
    weak = weights_for("flux", "weak input", W)
    assert weak["transformer_blocks.3"] == pytest.approx(0.2 * W) and weak["single_transformer_blocks.3"] == W
    ease = weights_for("sd3", "ease out", W)
    assert ease["transformer_blocks.19"] == pytest.approx(W * (0.05 + 0.95 * 19 / 38))


def test_precise_swap_modules():
    assert swapped_modules("sdxl", "style transfer precise") == ["down_blocks.2.attentions.1"]
    assert swapped_modules("sd15", "style transfer precise") == ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1"]
    assert "down_blocks.2.attentions.1" not in swapped_modules("sdxl", "composition precise")
    assert len(swapped_modules("sdxl", "composition precise")) == 10
    assert swapped_modules("sdxl", "linear") == []


def test_bad_names_are_refused_in_one_line():
    with pytest.raises(ValueError, match="weight_type: expected one of .*'linear'.*got 'lineer'"):
        weights_for("sdxl", "lineer")
    with pytest.raises(ValueError, match="not defined for sd3"):
        weights_for("sd3", "style transfer")
    with pytest.raises(ValueError, match="arch"):
        weights_for("wan", "linear")
    assert len(EMBEDS_SCALING) == 4
