"""The trainable adapter: K/V weights only in the target layers (copies of to_k/to_v), gradients
only there and in the image projection, nothing upstream of the first target in the backward,
and both exports (ours, diffusers') loading to the same UNet output as the trained model."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import instantstyle
from helpers.ip_fixtures import CLIP, image_embeds, tiny_unet, unet_inputs
from instantstyle.processors import FusedIPAdapterAttnProcessor
from instantstyle.training.export import DIFFUSERS, OURS, original_image_proj, write_exports
from instantstyle.training.model import install_adapter, trainable_parameters

ENCODER = SimpleNamespace(projection_dim=CLIP, hidden_size=CLIP)
STYLE = "up_blocks.0.attentions.1."


def _embeds(fmt, batch=2):
    return image_embeds(batch, 1, seed=3, tokens=None if fmt == "base" else 5)


def _perturb(unet):
    with torch.no_grad():  # trained weights, not the init: the exports must carry them
        for _, p in trainable_parameters(unet):
            p.add_(torch.randn_like(p) * 0.2)


def test_weights_only_in_target_layers_initialised_from_to_k_to_v():
    unet = tiny_unet("sdxl")
    adapter = install_adapter(unet, "style", "base", ENCODER, seed=0)
    assert sorted(adapter.weights) == sorted(n for n in unet.attn_processors if n.startswith(STYLE) and "attn2" in n)
    modules = dict(unet.named_modules())
    for name, proc in unet.attn_processors.items():
        if not name.endswith("attn2.processor"):
            continue
        assert isinstance(proc, FusedIPAdapterAttnProcessor)
        attn = modules[name[: -len(".processor")]]
        if name in adapter.weights:
            assert proc.adapter_ids == [0] and torch.equal(proc.to_k_ip[0].weight, attn.to_k.weight)
            assert torch.equal(proc.to_v_ip[0].weight, attn.to_v.weight)
        else:
            assert proc.adapter_ids == [] and len(proc.to_k_ip) == 0
    names = [n for n, _ in trainable_parameters(unet)]
    assert all(n.startswith(("encoder_hid_proj.", STYLE)) for n in names) and len(names) == 4 + 2 * 3
    same = install_adapter(tiny_unet("sdxl"), "style", "base", ENCODER, seed=0).projection.state_dict()
    assert all(torch.equal(v, same[k]) for k, v in adapter.projection.state_dict().items())  # init from the seed alone
    with pytest.raises(ValueError, match="matches no cross-attention layer"):
        install_adapter(tiny_unet("sdxl"), ["down_blocks.0"], "base", ENCODER)


def _upstream_requires_grad(target):
    """Which module outputs before the style block are part of the autograd graph."""
    unet = tiny_unet("sdxl")
    install_adapter(unet, target, "base", ENCODER, seed=0)
    seen = {}
    watched = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    watched.update({"mid_block": unet.mid_block, "up_blocks.0.attentions.0": unet.up_blocks[0].attentions[0]})

    def hook(name):
        def record(module, args, output):
            first = output[0] if isinstance(output, tuple) else output
            seen[name] = bool(first.requires_grad)
        return record

    for name, module in watched.items():
        module.register_forward_hook(hook(name))
    kwargs = unet_inputs(unet)
    kwargs["added_cond_kwargs"]["image_embeds"] = [_embeds("base")]
    unet(**kwargs).sample.square().mean().backward()
    return unet, seen


def test_gradients_reach_only_the_trained_weights_and_nothing_upstream_of_the_first_target():
    unet, seen = _upstream_requires_grad("style")
    assert not any(seen.values()), seen  # no backward through the down blocks, mid block, up_blocks.0.attentions.0
    trained = dict(trainable_parameters(unet))
    for name, p in unet.named_parameters():
        if name in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    _, seen_all = _upstream_requires_grad("all")  # the check can fail: every layer trained
    assert seen_all["down_blocks.1"] and seen_all["mid_block"]


@pytest.mark.parametrize("fmt", ["base", "plus"])
def test_both_exports_load_with_equal_outputs(fmt, tmp_path):
    target = {"up": {"block_0": [0.0, 0.5, 0.0]}}  # weight 0.5: folded into diffusers' to_v_ip
    trained = tiny_unet("sdxl")
    adapter = install_adapter(trained, target, fmt, ENCODER, seed=1)
    _perturb(trained)
    paths = write_exports(adapter, str(tmp_path))
    with safe_open(paths[OURS], "pt") as f:
        ours_keys, meta = set(f.keys()), f.metadata()
    with safe_open(paths[DIFFUSERS], "pt") as f:
        diffusers_state = {"image_proj": {}, "ip_adapter": {}}
        for key in f.keys():
            part, rest = key.split(".", 1)
            diffusers_state[part][rest] = f.get_tensor(key)
    assert len([k for k in ours_keys if k.startswith("ip_adapter.")]) == 2 * 3 and meta["instantstyle.adapter_format"] == fmt
    assert len(diffusers_state["ip_adapter"]) == 2 * 28

    ours = tiny_unet("sdxl")
    report = instantstyle.load_ip_adapter(ours, paths[OURS], target=target, image_encoder_folder=None)
    assert report.ip_params == sum(p.numel() for n, p in trainable_parameters(trained) if "to_" in n and "_ip." in n)
    theirs = tiny_unet("sdxl")
    theirs._load_ip_adapter_weights([diffusers_state], low_cpu_mem_usage=False)  # what pipe.load_ip_adapter calls
    # the original-layout projection round-trips through diffusers' converter exactly
    converted = theirs.encoder_hid_proj.image_projection_layers[0].state_dict()
    assert all(torch.equal(v, converted[k]) for k, v in adapter.projection.state_dict().items())
    assert set(original_image_proj(adapter)) == {k[len("image_proj."):] for k in ours_keys if k.startswith("image_proj.")}

    kwargs = unet_inputs(trained)
    kwargs["added_cond_kwargs"]["image_embeds"] = [_embeds(fmt)]
    with torch.no_grad():
        want = trained(**copy.deepcopy(kwargs)).sample
        got_ours = ours(**copy.deepcopy(kwargs)).sample
        got_theirs = theirs(**copy.deepcopy(kwargs)).sample
        without = tiny_unet("sdxl")(**{k: v for k, v in kwargs.items() if k != "added_cond_kwargs"},
                                    added_cond_kwargs={k: v for k, v in kwargs["added_cond_kwargs"].items()
                                                       if k != "image_embeds"}).sample
    torch.testing.assert_close(got_ours, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_theirs, want, atol=1e-5, rtol=1e-5)
    assert (want - without).abs().max() > 1e-3  # the adapter does something
