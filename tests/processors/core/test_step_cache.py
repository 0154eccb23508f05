"""Per-run caches: within one denoising run (falling timesteps), the image projection and
each layer's IP K/V are computed once while the embeddings and weights are the same,
unmodified tensors, and recomputed otherwise.  The defects of the old, run-less design
(edits no version counter sees, autocast) are in ``test_cache_staleness``."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.loaders import IPAdapterMixin
from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet, unet_inputs

from instantstyle.kernels import check_close
from instantstyle.loaders import load_ip_adapter
from instantstyle.processors import set_caches, use_fused_processors
from instantstyle.processors.unet.image_projection import CachedImageProjection


class Pipe(IPAdapterMixin):
    def __init__(self, unet):
        self.unet = unet


def _loaded(target="style+layout"):
    unet = tiny_unet("sdxl")
    load_ip_adapter(unet, random_checkpoint(unet, seed=3), target=target)
    set_caches(unet, True)
    return unet


def _step(unet, embeds, timestep=500, mode=torch.no_grad):
    kwargs = unet_inputs(unet)
    kwargs["timestep"] = torch.tensor(timestep)
    kwargs["added_cond_kwargs"]["image_embeds"] = embeds
    with mode():
        return unet(**kwargs).sample


def _fresh(unet, embeds, **kw):
    """The same step on an uncached copy of the model and of the embeddings."""
    return _step(copy.deepcopy(unet), [e.clone() for e in embeds], **kw)


def _count_projections(unet):
    calls = []
    for layer in unet.encoder_hid_proj.image_projection_layers:
        layer.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_projection_and_kv_run_once_per_run_and_match_uncached():
    unet = _loaded()
    assert isinstance(unet.encoder_hid_proj, CachedImageProjection)
    calls = _count_projections(unet)
    embeds = [image_embeds(2, 1, seed=7)]
    outs = [_step(unet, embeds, timestep=t) for t in (900, 500, 100)]
    assert len(calls) == 1
    for out, t in zip(outs, (900, 500, 100)):
        check_close(out, _fresh(unet, embeds, timestep=t), "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("change", ["embeds in place", "new embeds", "weight in place", "projection weight in place"])
def test_any_change_is_seen(change):
    unet = _loaded()
    embeds = [image_embeds(2, 1, seed=7)]
    _step(unet, embeds, timestep=900)  # the same run: the change is seen by the checks, not by a new run
    with torch.no_grad():
        if change == "embeds in place":
            embeds[0].mul_(-1)
        elif change == "new embeds":
            embeds = [image_embeds(2, 1, seed=8)]
        elif change == "weight in place":
            proc = unet.attn_processors["up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"]
            proc.to_k_ip[0].weight.mul_(3)
        else:
            next(unet.encoder_hid_proj.parameters()).mul_(3)
    second = _step(unet, embeds, timestep=500)
    unchanged = _fresh(_loaded(), [image_embeds(2, 1, seed=7)], timestep=500)
    assert (second - unchanged).abs().max() > 1e-4
    check_close(second, _fresh(unet, embeds, timestep=500), "fp32")


def test_scales_are_never_cached():
    unet = _loaded()
    embeds = [image_embeds(2, 1, seed=7)]
    _step(unet, embeds, timestep=900)
    Pipe(unet).set_ip_adapter_scale(0.25)
    check_close(_step(unet, embeds, timestep=500), _fresh(unet, embeds, timestep=500), "fp32")


def test_inference_mode_and_grad_are_uncached_but_correct():
    unet = _loaded()
    calls = _count_projections(unet)
    with torch.inference_mode():
        embeds = [image_embeds(2, 1, seed=7)]
        outs = [_step(unet, embeds, timestep=t, mode=torch.inference_mode) for t in (900, 500)]
    assert len(calls) == 2  # inference tensors keep no version counter: no caching, even within a run
    embeds = [image_embeds(2, 1, seed=7).requires_grad_()]
    _step(unet, embeds, timestep=900, mode=torch.enable_grad)
    _step(unet, embeds, timestep=500, mode=torch.enable_grad)
    assert len(calls) == 4  # autograd records: no caching
    check_close(outs[1], _fresh(unet, [image_embeds(2, 1, seed=7)], timestep=500), "fp32")


def test_use_fused_processors_caches_diffusers_projection_too():
    unet = tiny_unet("sdxl")
    ref = copy.deepcopy(unet)
    unet._load_ip_adapter_weights([random_checkpoint(unet, seed=3)])
    ref._load_ip_adapter_weights([random_checkpoint(ref, seed=3)])
    use_fused_processors(unet)
    assert isinstance(unet.encoder_hid_proj, CachedImageProjection)
    embeds = [image_embeds(2, 1, seed=7)]
    for t in (900, 100):
        check_close(_step(unet, embeds, timestep=t), _step(ref, embeds, timestep=t), "fp32")


def _step_with_text(unet, text, embeds, timestep=500):
    kwargs = unet_inputs(unet)
    kwargs["timestep"] = torch.tensor(timestep)
    kwargs["encoder_hidden_states"] = text
    kwargs["added_cond_kwargs"]["image_embeds"] = embeds
    with torch.no_grad():
        return unet(**kwargs).sample


def test_text_keys_and_values_follow_in_place_prompt_changes():
    unet = _loaded()
    embeds = [image_embeds(2, 1, seed=7)]
    text = unet_inputs(unet)["encoder_hidden_states"].clone()
    _step_with_text(unet, text, embeds, timestep=900)
    cached = _step_with_text(unet, text, embeds, timestep=500)  # the same run: cached
    check_close(cached, _step_with_text(copy.deepcopy(unet), text.clone(), embeds, timestep=500), "fp32")
    before = text.clone()
    with torch.no_grad():
        text[:, 3:].mul_(-2)  # a prompt edited in place between steps of the run
    second = _step_with_text(unet, text, embeds, timestep=100)
    assert (second - _step_with_text(copy.deepcopy(unet), before, embeds, timestep=100)).abs().max() > 1e-4
    check_close(second, _step_with_text(copy.deepcopy(unet), text.clone(), [e.clone() for e in embeds], timestep=100), "fp32")


class ScaledLinear(torch.nn.Linear):
    """A LoRA-style projection whose output depends on a Python attribute (a LoRA scale)."""

    factor = 1.0

    def forward(self, x):
        return super().forward(x) * self.factor


def test_projections_that_are_not_bare_linears_are_never_cached():
    unet = _loaded()
    embeds = [image_embeds(2, 1, seed=7)]
    text = unet_inputs(unet)["encoder_hidden_states"]
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            for part in ("to_k", "to_v"):
                old = getattr(module, part)
                new = ScaledLinear(old.in_features, old.out_features, bias=old.bias is not None)
                new.load_state_dict(old.state_dict())
                setattr(module, part, new)
    _step_with_text(unet, text, embeds, timestep=900)
    unscaled = _step_with_text(copy.deepcopy(unet), text, embeds, timestep=800)
    ScaledLinear.factor = 3.0  # no tensor changes: only recomputing sees it
    try:
        second = _step_with_text(unet, text, embeds, timestep=800)  # the same run as the 900 call
    finally:
        ScaledLinear.factor = 1.0
    assert (second - unscaled).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("convert", ["to float64 and back", "data swapped"])
def test_conversions_that_keep_parameter_versions_empty_the_caches(convert):
    unet = _loaded()
    embeds = [image_embeds(2, 1, seed=7)]
    _step(unet, embeds, timestep=900)
    with torch.no_grad():
        if convert == "data swapped":  # .data= keeps the Parameter and its version counter
            for name, p in unet.named_parameters():
                if ("to_k" in name or "to_v" in name or "encoder_hid_proj" in name) and p.dim() == 2:
                    p.data = p.data * 1.5
        else:  # round trip: the same dtype again, the values rounded through float16
            unet.half()
            unet.float()
    second = _step(unet, embeds, timestep=800)  # the same run: the conversion itself must empty the caches
    assert (second - _fresh(_loaded(), [image_embeds(2, 1, seed=7)], timestep=800)).abs().max() > 1e-6
    check_close(second, _fresh(unet, embeds, timestep=800), "fp32")


def test_precise_swap_reuses_the_runs_kv_and_equals_swapping_the_states(monkeypatch):
    """The precise types' CFG-half swap is done on the cached K/V (rows move; a zero row
    projects to the bias), so a swapped layer projects once per run, and its output equals
    projecting the swapped states by hand, a biased projection included."""
    unet = tiny_unet("sdxl")
    load_ip_adapter(unet, random_checkpoint(unet, seed=3), weight_type="style transfer precise", weight=0.9,
                    composition_weight=1.2)
    set_caches(unet, True)
    swapped = {n: p for n, p in unet.attn_processors.items() if getattr(p, "swap_halves", [False])[0]}
    assert swapped
    for proc in swapped.values():  # biased projections: the zero half must project to the biases
        for projections in (proc.to_k_ip, proc.to_v_ip):
            biased = torch.nn.Linear(projections[0].in_features, projections[0].out_features, bias=True)
            with torch.no_grad():
                biased.weight.copy_(projections[0].weight)
                biased.bias.normal_(generator=torch.Generator().manual_seed(1))
            projections[0] = biased
    reference = copy.deepcopy(unet)
    for proc in (p for n, p in reference.attn_processors.items() if n in swapped):
        proc.swap_halves = [False]  # by hand instead: the projections see [cond ; zeros]
        for lin in (proc.to_k_ip[0], proc.to_v_ip[0]):
            lin.register_forward_pre_hook(lambda m, args: (torch.cat([args[0][args[0].shape[0] // 2:],
                                                                       torch.zeros_like(args[0][args[0].shape[0] // 2:])]),))
    import instantstyle.processors.core.ip_adapter as ip_adapter

    projected, original = [], ip_adapter.linear
    monkeypatch.setattr(ip_adapter, "linear", lambda m, x: (projected.append(m), original(m, x))[1])
    embeds = [image_embeds(2, 1, seed=7)]
    for t in (900, 500, 100):  # one run: falling timesteps
        check_close(_step(unet, embeds, timestep=t), _step(reference, embeds, timestep=t), "fp32")
    ours = {id(m) for p in swapped.values() for m in (p.to_k_ip[0], p.to_v_ip[0])}
    assert sum(id(m) in ours for m in projected) == len(ours)  # once per run, not once per step
