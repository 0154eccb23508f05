"""Wan sites, presets and architecture detection through the shared registry; the
full-size block map on the meta device; the dispatch plan for Wan's shapes; the bench layer."""
import pytest
import torch

from instantstyle.processors import PRESETS, attention_sites, detect_arch, registry_of
from instantstyle.processors.core.models import transformer_family


@pytest.mark.parametrize("family", ["wan", "skyreels", "chronoedit"])
def test_sites_are_self_and_cross_per_block(family, request):
    model = request.getfixturevalue(family)
    assert transformer_family(model) == "wan" and detect_arch(model.config) == "wan"
    sites = attention_sites(model)
    assert [(s.name, s.kind) for s in sites[:2]] == [("blocks.0.attn1.processor", "self"), ("blocks.0.attn2.processor", "cross")]
    assert [s.name for s in sites if s.takes_ip] == [f"blocks.{i}.attn2.processor" for i in range(3)]
    assert all((s.heads, s.head_dim) == (2, 12) for s in sites)
    registry = registry_of(model)
    assert list(registry.resolve("all", "cross")) == [f"blocks.{i}.attn2.processor" for i in range(3)]
    assert list(registry.resolve("all", "self")) == [f"blocks.{i}.attn1.processor" for i in range(3)]
    assert registry.resolve({"blocks": [0.0, 0.5, 0.0]}, "cross") == {"blocks.1.attn2.processor": 0.5}


def test_presets_are_all_only_until_a_block_analysis_is_cited():
    assert PRESETS["wan"] == {"all": ("*",)}


def test_blocks_lists_the_full_size_model_on_meta():
    from instantstyle.blocks_cli import _table, describe_blocks

    rows, summary = describe_blocks("wan", "blocks.3*", cross_only=True)
    assert len(rows) == 40 and all(r["kind"] == "cross" and (r["heads"], r["head_dim"]) == (40, 128) for r in rows)
    assert rows[0]["queries"] == 32760 and rows[0]["injected"] == ["image_branch"]
    assert rows[3]["injected"] == ["image_branch", "set_image_scale"]
    assert summary["image_layers"] == 11 and summary["image_layers_all"] == 40  # blocks.3, blocks.30-39
    assert summary["image_params_all"] == 40 * (2 * (5120 * 5120 + 5120) + 5120)
    assert "set_image_scale acts on 11 of 40" in _table(rows, summary)


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_info_explains_two_sdpa_calls_for_wan_shapes(arch):
    from instantstyle.info import dispatch_table

    (row,) = dispatch_table((2, 32760, 40, 128, 512, 257), ["bfloat16"], "cuda", arch)
    assert row["backend"] == "torch"
    (why,) = row["not_chosen"]["triton"]
    assert "769 keys > 512" in why and "two calls for a Wan cross-attention layer" in why
    assert "until a GPU measures otherwise" in why and f"no measurement on {arch}" in why


def test_bench_layer_fused_matches_diffusers():
    from instantstyle.bench import suite_processor, wan_layers

    case = suite_processor.AttnCase("tiny-wan", B=2, N=12, channels=24, heads=2, Lt=512, cross_dim=24, ip_tokens=5, family="wan")
    attn, procs = suite_processor.build_attention(case, torch.float64, torch.device("cpu"))
    inputs = suite_processor._inputs(case, torch.float64, torch.device("cpu"), 0)
    outs = {}
    for name, proc in procs.items():
        attn.set_processor(proc)
        outs[name] = suite_processor._call(attn, inputs, name != "no-ip")
    assert (outs["fused"] - outs["diffusers"]).abs().max().item() < 1e-10
    assert not torch.allclose(outs["no-ip"], outs["diffusers"])  # the floor has no image branch
    assert {c.name for c in suite_processor.QUICK_CASES} >= {"wan-attn2-cpu"}
    assert {c.name for c in suite_processor.GPU_SIZED} >= {"wan-attn2-480p", "wan-attn2-720p", "wan-flf2v-attn2-480p"}
    assert wan_layers.WAN_TEXT == 512
