"""Whole tiny UNets (real SDXL / SD1.5 block structure): our loader and processors
against diffusers' loader + set_ip_adapter_scale, from state dicts and from files."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

from instantstyle.kernels import check_close
from instantstyle.loaders import load_ip_adapter
from instantstyle.processors import (
    FusedAttnProcessor,
    FusedIPAdapterAttnProcessor,
    fallback_reasons,
    use_fused_processors,
)

from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet, unet_inputs
from helpers.unet_reference import IPAdapterPipe, diffusers_loaded, forward

pytestmark = pytest.mark.slow  # whole tiny UNets, ours and diffusers' (test_fused_processor checks one layer, quickly)


def ip_param_total(unet):
    return sum(p.numel() for n, p in unet.named_parameters() if "_ip." in n)


CASES = [
    ("sdxl", "style", {"up": {"block_0": [0.0, 1.0, 0.0]}}, 3),
    ("sdxl", "layout", {"down": {"block_2": [0.0, 1.0]}}, 3),
    ("sdxl", "style+layout", {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}, 6),
    ("sdxl", "all", 1.0, 28),
    ("sd15", "style", {"up": {"block_1": 1.0}}, 3),
    ("sd15", "layout", {"down": {"block_2": 1.0}, "mid": 1.0}, 3),
    ("sd15", "style+layout", {"down": {"block_2": 1.0}, "mid": 1.0, "up": {"block_1": 1.0}}, 6),
]


@pytest.mark.parametrize("arch, preset, scale_config, layers", CASES)
def test_preset_matches_diffusers_scale_dict(arch, preset, scale_config, layers):
    unet = tiny_unet(arch)
    ckpt = random_checkpoint(unet, seed=1)
    ref = diffusers_loaded(unet, [ckpt], scale_config)
    ours = copy.deepcopy(unet)
    report = load_ip_adapter(ours, ckpt, target=preset)
    embeds = [image_embeds(2, 1, seed=3)]
    check_close(forward(ours, embeds), forward(ref, embeds), "fp32")
    # zero cost outside the targets: only the target layers hold IP weights
    assert len(report.adapters[0].layers) == layers
    per_layer = ip_param_total(ref) // 28 if arch == "sdxl" else None
    assert ip_param_total(ours) == report.ip_params
    assert report.ip_params_all_layers == ip_param_total(ref)
    if per_layer and preset != "all":
        assert report.ip_params < report.ip_params_all_layers
    assert report.bytes_saved == 4 * (report.ip_params_all_layers - report.ip_params)
    kinds = {type(p) for n, p in ours.attn_processors.items() if n.endswith("attn2.processor")}
    assert kinds <= {FusedAttnProcessor, FusedIPAdapterAttnProcessor}


def test_dict_target_and_scale_match_diffusers():
    unet = tiny_unet("sdxl")
    ckpt = random_checkpoint(unet, seed=2)
    config = {"down": {"block_2": [0.0, 0.5]}, "up": {"block_0": [0.25, 1.0, 0.0]}, "mid": 0.75}
    ref = diffusers_loaded(unet, [ckpt], {"down": {"block_2": [0.0, 0.25]}, "up": {"block_0": [0.125, 0.5, 0.0]}, "mid": 0.375})
    ours = copy.deepcopy(unet)
    report = load_ip_adapter(ours, ckpt, target=config, scale=0.5)
    assert len(report.adapters[0].layers) == 3 + 3 + 3 + 3  # down_blocks.2.attentions.1, up 0.0 and 0.1, mid
    embeds = [image_embeds(2, 2, seed=4)]  # two images, one joint softmax
    check_close(forward(ours, embeds), forward(ref, embeds), "fp32")


def test_two_adapters_layout_from_a_style_from_b():
    """Layout from a base adapter, style from a Plus adapter, each in its own blocks."""
    unet = tiny_unet("sdxl")
    a, b = random_checkpoint(unet, seed=5), random_checkpoint(unet, seed=6, flavour="plus")
    ref = diffusers_loaded(unet, [a, b], [{"down": {"block_2": [0.0, 0.5]}}, {"up": {"block_0": [0.0, 1.0, 0.0]}}])
    ours = copy.deepcopy(unet)
    report = load_ip_adapter(ours, [a, b], target=["layout", "style"], scale=[0.5, 1.0])
    assert [r.num_tokens for r in report.adapters] == [4, 16]
    embeds = [image_embeds(2, 1, seed=7), image_embeds(2, 1, seed=8, tokens=5)]
    check_close(forward(ours, embeds), forward(ref, embeds), "fp32")
    held = {n: p.adapter_ids for n, p in ours.attn_processors.items() if isinstance(p, FusedIPAdapterAttnProcessor) and p.adapter_ids}
    assert sorted(set(map(tuple, held.values()))) == [(0,), (1,)]
    assert all(n.startswith("down_blocks.2.attentions.1.") for n, ids in held.items() if ids == [0])
    assert all(n.startswith("up_blocks.0.attentions.1.") for n, ids in held.items() if ids == [1])
    # diffusers' set_ip_adapter_scale keeps working with partially held layers
    config = [{"down": {"block_2": [0.0, 0.25]}}, {"up": {"block_0": [0.0, 0.75, 0.0]}}]
    IPAdapterPipe(ours).set_ip_adapter_scale(config)
    IPAdapterPipe(ref).set_ip_adapter_scale(config)
    check_close(forward(ours, embeds), forward(ref, embeds), "fp32")


def test_masks_and_per_image_scales_through_the_unet():
    unet = tiny_unet("sd15")
    ckpt = random_checkpoint(unet, seed=9)
    ref = diffusers_loaded(unet, [ckpt], [[0.5, 1.0]])
    ours = copy.deepcopy(unet)
    load_ip_adapter(ours, ckpt, target="all", scale=[0.5, 1.0])
    embeds = [image_embeds(2, 2, seed=10)]
    mask = torch.zeros(1, 2, 16, 16)
    mask[:, 0, :, :8] = 1
    mask[:, 1, :, 8:] = 1
    kwargs = {"cross_attention_kwargs": {"ip_adapter_masks": [mask]}}
    check_close(forward(ours, embeds, **kwargs), forward(ref, embeds, **kwargs), "fp32")


def test_encoder_attention_mask_stays_fused():
    unet = tiny_unet("sdxl")
    ckpt = random_checkpoint(unet, seed=11)
    ref = diffusers_loaded(unet, [ckpt], 0.75)
    ours = copy.deepcopy(unet)
    load_ip_adapter(ours, ckpt, scale=0.75)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    embeds = [image_embeds(2, 1, seed=12)]
    extra = {"encoder_attention_mask": keep}
    check_close(forward(ours, embeds, **extra), forward(ref, embeds, **extra), "fp32")
    assert fallback_reasons(ours) == {}


def test_set_scale_and_unload_keep_working():
    unet = tiny_unet("sdxl")
    ckpt = random_checkpoint(unet, seed=13)
    ours = copy.deepcopy(unet)
    load_ip_adapter(ours, ckpt, target="style+layout")
    pipe = IPAdapterPipe(ours)
    pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 0.5, 0.0]}})
    ref = diffusers_loaded(unet, [ckpt], {"up": {"block_0": [0.0, 0.5, 0.0]}})
    embeds = [image_embeds(2, 1, seed=14)]
    check_close(forward(ours, embeds), forward(ref, embeds), "fp32")
    pipe.unload_ip_adapter()
    assert ip_param_total(ours) == 0 and ours.encoder_hid_proj is None
    kwargs = unet_inputs(unet)
    with torch.no_grad():
        check_close(ours(**kwargs).sample, unet(**kwargs).sample, "fp32")


@pytest.mark.parametrize("flavour", ["base", "full", "plus"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_files_match_diffusers_pipeline_loader(tmp_path, flavour, fmt):
    unet = tiny_unet("sd15")
    ckpt = random_checkpoint(unet, seed=15, flavour=flavour)
    path = os.path.join(tmp_path, f"ip.{fmt}")
    if fmt == "bin":
        torch.save(ckpt, path)
    else:
        from safetensors.torch import save_file

        save_file({f"{part}.{k}": v.contiguous() for part in ckpt for k, v in ckpt[part].items()}, path)
    ref = copy.deepcopy(unet)
    IPAdapterPipe(ref).load_ip_adapter(str(tmp_path), subfolder="", weight_name=f"ip.{fmt}", image_encoder_folder=None)
    IPAdapterPipe(ref).set_ip_adapter_scale({"up": {"block_1": 1.0}})
    ours = copy.deepcopy(unet)
    report = load_ip_adapter(ours, path, target="style")
    assert report.adapters[0].source == path
    tokens = {"base": None, "full": 257, "plus": 5}[flavour]
    embeds = [image_embeds(2, 1, seed=16, tokens=tokens)]
    check_close(forward(ours, embeds), forward(ref, embeds), "fp32")


def test_use_fused_processors_after_diffusers_load():
    unet = tiny_unet("sdxl")
    a, b = random_checkpoint(unet, seed=17), random_checkpoint(unet, seed=18)
    ref = diffusers_loaded(unet, [a, b], [0.5, {"up": {"block_0": [0.0, 1.0, 0.0]}}])
    ours = copy.deepcopy(ref)
    replaced = use_fused_processors(IPAdapterPipe(ours))
    assert len(replaced) == 28 and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in replaced.values())
    assert all(isinstance(ours.attn_processors[n], FusedIPAdapterAttnProcessor) for n in replaced)
    assert ours.attn_processors[next(iter(replaced))].scale == ref.attn_processors[next(iter(replaced))].scale
    embeds = [image_embeds(2, 1, seed=19), image_embeds(2, 1, seed=20)]
    check_close(forward(ours, embeds), forward(ref, embeds), "fp32")
    assert use_fused_processors(ours) == {}  # idempotent
    # a plain UNet: every cross-attention processor is swapped, self-attention is not
    plain = copy.deepcopy(unet)
    replaced = use_fused_processors(plain)
    assert len(replaced) == 28 and all(isinstance(p, AttnProcessor2_0) for p in replaced.values())
    assert all(isinstance(p, AttnProcessor2_0) for n, p in plain.attn_processors.items() if n.endswith("attn1.processor"))
    kwargs = unet_inputs(unet)
    with torch.no_grad():
        check_close(plain(**kwargs).sample, unet(**kwargs).sample, "fp32")


def test_step_gate_switches_ip_off_outside_the_range():
    unet = tiny_unet("sd15")
    ckpt = random_checkpoint(unet, seed=21)
    gated, full, off = copy.deepcopy(unet), copy.deepcopy(unet), copy.deepcopy(unet)
    load_ip_adapter(gated, ckpt, target="style", start_at=0.25, end_at=0.6)
    load_ip_adapter(full, ckpt, target="style")
    load_ip_adapter(off, ckpt, target="style", scale=0.0)
    embeds = [image_embeds(2, 1, seed=22)]

    def at(model, t):
        kwargs = unet_inputs(model)
        kwargs["timestep"] = torch.tensor(t)
        with torch.no_grad():
            return model(**kwargs, added_cond_kwargs={"image_embeds": embeds}).sample

    # progress 0.25..0.6 of a 1000-step schedule = timesteps 399.6..749.25
    for t, expected in [(999, off), (700, full), (100, off)]:
        check_close(at(gated, t), at(expected, t), "fp32")
