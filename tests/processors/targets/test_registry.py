"""The registry on the full-size SDXL and SD1.5 architectures (meta device, no memory):
presets, key ids against diffusers' own numbering, parameter counts, bad configs."""
from __future__ import annotations

import copy

import pytest
import torch

from instantstyle.loaders import ip_param_counts, load_ip_adapter
from instantstyle.processors import (
    InjectionRegistry,
    build_meta_unet,
    detect_arch,
    ip_key_ids,
    ip_sites,
    pattern_matches,
    register_preset,
    registry_of,
)
from instantstyle.processors.targets.presets import PRESETS

from helpers.ip_fixtures import random_checkpoint, tiny_unet


@pytest.fixture(scope="module")
def sdxl():
    return build_meta_unet("sdxl")


@pytest.fixture(scope="module")
def sd15():
    return build_meta_unet("sd15")


def test_detects_architecture_from_block_structure(sdxl, sd15):
    assert detect_arch(sdxl.config) == "sdxl" and detect_arch(sd15.config) == "sd15"
    assert detect_arch({"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "cross_attention_dim": 1024}) == "sd2"
    assert detect_arch(tiny_unet("sdxl").config) == "sdxl" and detect_arch(tiny_unet("sd15").config) == "sd15"
    assert detect_arch({"down_block_types": ["CrossAttnDownBlock2D"] * 2}) is None


def test_sdxl_style_is_exactly_the_ten_layers_of_up_blocks_0_attentions_1(sdxl):
    reg = InjectionRegistry(sdxl)
    style = reg.resolve("style")
    assert list(style) == [f"up_blocks.0.attentions.1.transformer_blocks.{i}.attn2.processor" for i in range(10)]
    assert len(reg.candidates("cross")) == 70
    ids = ip_key_ids(sdxl)
    assert [ids[n] for n in style] == list(range(69, 88, 2))
    assert [ids[n] for n in reg.resolve("layout")] == list(range(29, 48, 2))
    assert sorted(ids.values()) == list(range(1, 140, 2))
    heads = {(s.heads, s.head_dim) for s in reg.sites if s.name in style}
    assert heads == {(20, 64)}


def test_sd15_presets(sd15):
    reg = InjectionRegistry(sd15)
    assert sorted(ip_key_ids(sd15).values()) == list(range(1, 32, 2))
    assert [n.split(".transformer")[0] for n in reg.resolve("style")] == [f"up_blocks.1.attentions.{i}" for i in range(3)]
    assert sorted({n.split(".transformer")[0] for n in reg.resolve("layout")}) == [
        "down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0"]
    assert len(reg.resolve("style+layout")) == 6 and len(reg.resolve("all")) == 16


class _Recorder(dict):
    """A state dict that records which keys diffusers' loader reads, in order."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_key_ids_match_diffusers_loader(arch, sdxl, sd15):
    """diffusers' own _convert_ip_adapter_attn_to_diffusers, run on the meta model, reads
    key ``<id>.to_k_ip.weight`` for each IP layer: those ids must be ours."""
    unet = {"sdxl": sdxl, "sd15": sd15}[arch]
    sites = ip_sites(unet)
    ip = _Recorder()
    for i, s in enumerate(sites):
        shape = (s.module.to_k.out_features, s.module.to_k.in_features)
        for proj in ("to_k_ip", "to_v_ip"):
            ip[f"{2 * i + 1}.{proj}.weight"] = torch.empty(shape, device="meta")
    with torch.device("meta"):
        procs = unet._convert_ip_adapter_attn_to_diffusers([{"image_proj": {"proj.weight": None}, "ip_adapter": ip}], low_cpu_mem_usage=False)
    ip_names = [n for n, p in procs.items() if hasattr(p, "to_k_ip")]
    read_ids = [int(k.split(".")[0]) for k in ip.reads if k.endswith("to_k_ip.weight")]
    ours = ip_key_ids(unet)
    assert ip_names == [s.name for s in sites]
    assert read_ids == [ours[n] for n in ip_names]


def _layer_params(unet, names):
    modules = dict(unet.named_modules())
    total = 0
    for n in names:
        to_k = modules[n[: -len(".processor")]].to_k
        total += 2 * to_k.in_features * to_k.out_features
    return total


def test_ip_parameter_counts_per_preset(sdxl, sd15):
    per_sdxl_1280 = 2 * 2048 * 1280
    expected = {
        "style": 10 * per_sdxl_1280,
        "layout": 10 * per_sdxl_1280,
        "style+layout": 20 * per_sdxl_1280,
        "all": 340_787_200,
    }
    for preset, n in expected.items():
        counts = ip_param_counts(sdxl, preset)
        assert counts == {"held": n, "all_layers": 340_787_200}, preset
    # the SDXL style preset holds 1/7 of the all-layers IP weights by layer count; 10/70 layers
    assert len(InjectionRegistry(sdxl).resolve("style")) * 7 == 70
    reg = InjectionRegistry(sd15)
    for preset in ("style", "layout", "style+layout", "all"):
        assert ip_param_counts(sd15, preset)["held"] == _layer_params(sd15, reg.resolve(preset))
    assert ip_param_counts(sd15, "all")["held"] == 2 * 768 * (320 * 5 + 640 * 5 + 1280 * 6)


def test_pattern_matching_is_by_component():
    comps = tuple("mid_block.attentions.0.transformer_blocks.0.attn2".split("."))
    assert pattern_matches("mid_block", comps)
    assert not pattern_matches("block", comps)
    assert not pattern_matches("mid", comps)
    assert pattern_matches("*.attentions.0", comps)
    assert pattern_matches("mid_block.*.0.transformer_blocks.?", comps)
    assert not pattern_matches("up_blocks.1", tuple("up_blocks.10.attentions.0".split(".")))


def test_patterns_globs_and_dicts(sdxl):
    reg = InjectionRegistry(sdxl)
    assert reg.resolve(["up_blocks.0.attentions.1"]) == reg.resolve("style")
    assert len(reg.resolve("up_blocks.*.attentions.1")) == 10 + 2
    assert set(reg.resolve({"up": {"block_0": [0.0, 1.0, 0.0]}})) == set(reg.resolve("style"))
    weights = reg.resolve({"down": {"block_2": [0.0, 0.5]}, "mid": 0.25})
    assert len(weights) == 20 and set(weights.values()) == {0.5, 0.25}
    # self-attention targets for other methods (e.g. Visual Style Prompting)
    assert len(reg.resolve(["up_blocks.1"], kind="self")) == 6


def test_registry_records_methods_and_custom_presets(sdxl):
    register_preset("sdxl", "test_decoder", ["up_blocks.1"])  # a name of its own: "vsp" belongs to a method
    try:
        reg = InjectionRegistry(sdxl)
        planned = {"visual_style_prompting": reg.resolve("test_decoder", kind="self")}
        assert len(planned["visual_style_prompting"]) == 6
        rows = {r["name"]: r for r in reg.table(planned)}
        assert rows["up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"]["injected"] == ["visual_style_prompting"]
        assert rows["up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"]["queries"] == 4096
        assert rows["up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"]["queries"] == 1024
        assert reg.injections == {}  # planned only: nothing is on the model
    finally:
        del PRESETS["sdxl"]["test_decoder"]


def test_bad_targets_raise_clear_errors(sdxl):
    reg = InjectionRegistry(sdxl)
    with pytest.raises(ValueError, match=r"unknown preset 'stlye'.*presets: style, layout, style\+layout, all"):
        reg.resolve("stlye")
    with pytest.raises(ValueError, match=r"pattern 'up_blocks.7' matches no cross-attention layer.*\n.*down_blocks.1.attentions.0 \(2 cross, 2 self\)"):
        reg.resolve(["up_blocks.7"])
    with pytest.raises(ValueError, match=r"pattern 'block'"):
        reg.resolve(["block"])
    with pytest.raises(ValueError, match=r"Expected 3 scales for up.block_0, got 2"):
        reg.resolve({"up": {"block_0": [0.0, 1.0]}})
    with pytest.raises(ValueError, match=r"dict keys among 'down', 'mid', 'up'.*'upp'"):
        reg.resolve({"upp": 1.0})
    with pytest.raises(ValueError, match="every weight is 0"):
        reg.resolve({"up": 0.0})
    with pytest.raises(TypeError, match="target: expected a preset name"):
        reg.resolve(3)
    with pytest.raises(ValueError, match="kind"):
        reg.resolve("style", kind="both")


def test_unknown_architecture_has_only_all():
    unet = tiny_unet("sd15")
    reg = InjectionRegistry(unet, arch=None)
    reg.arch = None  # as if unrecognised
    assert len(reg.resolve("all")) == 16
    with pytest.raises(ValueError, match=r"unknown preset 'style' for architecture unknown; presets: all"):
        reg.resolve("style")
    assert len(reg.resolve(["up_blocks.1"])) == 3


def test_checkpoint_errors_name_file_and_key(tmp_path):
    unet = tiny_unet("sdxl")
    good = random_checkpoint(unet, seed=1)
    bad = copy.deepcopy(good)
    bad["ip_adapter"]["41.to_v_ip.weight"] = torch.zeros(3, 3)
    path = str(tmp_path / "bad.bin")
    torch.save(bad, path)
    victim = copy.deepcopy(unet)
    before = {n: type(p) for n, p in victim.attn_processors.items()}
    with pytest.raises(ValueError, match=r"bad.bin: key 'ip_adapter.41.to_v_ip.weight': expected shape \(32, 32\), got \(3, 3\)"):
        load_ip_adapter(victim, path, target="all")
    assert {n: type(p) for n, p in victim.attn_processors.items()} == before  # left as it was
    assert victim.encoder_hid_proj is None
    sd15_ckpt = random_checkpoint(tiny_unet("sd15"), seed=1)
    with pytest.raises(ValueError, match=r"state dict: holds 16 IP layers.*28 cross-attention layers"):
        load_ip_adapter(copy.deepcopy(unet), sd15_ckpt)
    with pytest.raises(ValueError, match="'image_proj' and 'ip_adapter'"):
        load_ip_adapter(copy.deepcopy(unet), {"ip_adapter": good["ip_adapter"]})
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_ip_adapter(copy.deepcopy(unet), str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match=r"target: expected one entry per checkpoint \(2\)"):
        load_ip_adapter(copy.deepcopy(unet), [good, good], target=["style", "layout", "all"])
    with pytest.raises(ValueError, match=r"end_at: expected a value >= start_at"):
        load_ip_adapter(copy.deepcopy(unet), good, start_at=0.6, end_at=0.2)
    with pytest.raises(TypeError, match="model_or_pipeline"):
        load_ip_adapter(object(), good)


def test_registry_is_attached_and_reports_loaded_adapters():
    unet = copy.deepcopy(tiny_unet("sdxl"))
    load_ip_adapter(unet, random_checkpoint(unet, seed=3), target="style")
    reg = registry_of(unet)
    injected = [r["name"] for r in reg.table() if r["injected"]]
    assert len(injected) == 3 and all(n.startswith("up_blocks.0.attentions.1.") for n in injected)
