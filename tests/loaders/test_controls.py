"""set_weight_type / set_embeds_scaling / load_ip_adapter(weight_type=...) on tiny UNets."""
import copy

import pytest
import torch
from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet, unet_inputs
from helpers.unet_reference import diffusers_loaded, forward

import instantstyle
from instantstyle.processors.targets.weight_types import MODULE_MAPS, weights_for


def diffusers_dict(arch, values):
    """The per-module ``set_ip_adapter_scale`` dict for ``{module: value}``."""
    maps = MODULE_MAPS[arch]
    v = [values[m] for m in maps]
    if arch == "sdxl":
        return {"down": {"block_1": v[0:2], "block_2": v[2:4]}, "mid": v[4], "up": {"block_0": v[5:8], "block_1": v[8:11]}}
    return {"down": {"block_0": v[0:2], "block_1": v[2:4], "block_2": v[4:6]}, "mid": v[6],
            "up": {"block_1": v[7:10], "block_2": v[10:13], "block_3": v[13:16]}}


@pytest.mark.parametrize("arch,kind", [("sdxl", "ease in-out"), ("sdxl", "style and composition"), ("sd15", "composition"),
                                       ("sd15", "strong middle")])
def test_weight_type_equals_diffusers_per_module_scales(arch, kind):
    unet = tiny_unet(arch)
    ckpt = random_checkpoint(unet, seed=3)
    embeds = [image_embeds(2, 1, seed=4)]
    ref = diffusers_loaded(unet, [ckpt], diffusers_dict(arch, weights_for(arch, kind, 0.8, 1.4)))
    ours = copy.deepcopy(unet)
    instantstyle.load_ip_adapter(ours, ckpt, target="*")
    instantstyle.set_weight_type(ours, kind, weight=0.8, composition_weight=1.4)
    torch.testing.assert_close(forward(ours, embeds), forward(ref, embeds), atol=2e-5, rtol=2e-5)
    loaded = copy.deepcopy(unet)  # loading with the type: same output, weights only where non-zero
    report = instantstyle.load_ip_adapter(loaded, ckpt, weight_type=kind, weight=0.8, composition_weight=1.4)
    torch.testing.assert_close(forward(loaded, embeds), forward(ref, embeds), atol=2e-5, rtol=2e-5)
    nonzero = {m for m, v in weights_for(arch, kind, 0.8, 1.4).items() if v}
    assert {name.split(".transformer_blocks")[0] for name in report.adapters[0].layers} == nonzero


def test_weight_zero_modules_run_no_projection():
    unet = tiny_unet("sdxl")
    instantstyle.load_ip_adapter(unet, random_checkpoint(unet), target="*")
    instantstyle.set_weight_type(unet, "style transfer")
    calls = []
    for name, proc in unet.attn_processors.items():
        if hasattr(proc, "to_k_ip"):
            for lin in [*proc.to_k_ip, *proc.to_v_ip]:
                lin.register_forward_hook(lambda *a, n=name: calls.append(n))
    forward(unet, [image_embeds(2, 1)])
    assert calls and all(n.startswith("up_blocks.0.attentions.1.") for n in calls)


def test_k_plus_v_equals_scaled_ip_weights():
    unet = tiny_unet("sdxl")
    ckpt = random_checkpoint(unet, seed=5)
    w = 0.6
    scaled = {"image_proj": ckpt["image_proj"], "ip_adapter": {k: v * w for k, v in ckpt["ip_adapter"].items()}}
    embeds = [image_embeds(2, 1, seed=6)]
    a, b = copy.deepcopy(unet), copy.deepcopy(unet)
    instantstyle.load_ip_adapter(a, ckpt, scale=w, embeds_scaling="K+V")
    instantstyle.load_ip_adapter(b, scaled, scale=1.0)  # V only, weights times w: softmax(q (wK)^T) (wV)
    torch.testing.assert_close(forward(a, embeds), forward(b, embeds), atol=2e-5, rtol=2e-5)


def test_bad_input_leaves_the_model_alone():
    unet = tiny_unet("sdxl")
    before = dict(unet.attn_processors)
    with pytest.raises(ValueError, match="weight_type: expected one of"):
        instantstyle.load_ip_adapter(unet, random_checkpoint(unet), weight_type="heavy")
    with pytest.raises(ValueError, match="embeds_scaling: expected one of"):
        instantstyle.load_ip_adapter(unet, random_checkpoint(unet), embeds_scaling="K only")
    assert dict(unet.attn_processors) == before
    instantstyle.load_ip_adapter(unet, random_checkpoint(unet), target="style")
    scales = {n: list(p.scale) for n, p in unet.attn_processors.items() if hasattr(p, "to_k_ip")}
    with pytest.raises(ValueError, match="holds none"):
        instantstyle.set_weight_type(unet, "linear")
    assert scales == {n: list(p.scale) for n, p in unet.attn_processors.items() if hasattr(p, "to_k_ip")}


def test_ramp_on_load_equals_the_scale_at_that_step():
    unet = tiny_unet("sdxl")
    ckpt = random_checkpoint(unet, seed=8)
    embeds = [image_embeds(2, 1, seed=9)]
    ramped, fixed = copy.deepcopy(unet), copy.deepcopy(unet)
    instantstyle.load_ip_adapter(ramped, ckpt, target="style", start_at=0.2, end_at=0.8, ramp=("linear", 1.5, 0.1))
    t = 500  # unet_inputs' timestep: progress p = 1 - 500/999, r = (p - 0.2) / 0.6
    r = (1 - t / 999 - 0.2) / 0.6
    instantstyle.load_ip_adapter(fixed, ckpt, target="style", scale=1.5 + (0.1 - 1.5) * r)
    torch.testing.assert_close(forward(ramped, embeds), forward(fixed, embeds), atol=2e-5, rtol=2e-5)


def _flux_modules(model):
    return [f"transformer_blocks.{i}" for i in range(model.config.num_layers)] + \
           [f"single_transformer_blocks.{i}" for i in range(model.config.num_single_layers)]


def _run_dit(model, ip, inputs):
    with torch.no_grad():
        return model(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": ip}).sample


def test_flux_xlabs_weight_type_equals_per_block_scales():
    from helpers.dit_fixtures import embeds, flux_inputs, tiny_flux, xlabs_state

    model = tiny_flux()
    state = xlabs_state(model)
    values = weights_for("flux", "ease in", 0.9, modules=_flux_modules(model))
    typed, ref = copy.deepcopy(model), copy.deepcopy(model)
    instantstyle.load_ip_adapter(typed, state, weight_type="ease in", weight=0.9)
    instantstyle.load_ip_adapter(ref, state, target={"double": [values["transformer_blocks.0"], values["transformer_blocks.1"]]})
    ip = [embeds(2, 1, 32)]
    torch.testing.assert_close(_run_dit(typed, ip, flux_inputs()), _run_dit(ref, ip, flux_inputs()), atol=1e-12, rtol=1e-12)


def test_flux_instantx_composition_type_is_the_content_blocks():
    from helpers.dit_fixtures import embeds, flux_inputs, instantx_flux_state, tiny_flux

    model = tiny_flux()
    state = instantx_flux_state(model)
    typed, ref = copy.deepcopy(model), copy.deepcopy(model)
    instantstyle.load_ip_adapter(typed, state)
    values = instantstyle.set_weight_type(typed, "composition", weight=0.6)
    assert {n for n, v in values.items() if v} == {f"single_transformer_blocks.{i}.attn.processor" for i in range(3)}
    instantstyle.load_ip_adapter(ref, state, target={"single": 0.6})
    ip = [embeds(2, 1, 24)]
    torch.testing.assert_close(_run_dit(typed, ip, flux_inputs()), _run_dit(ref, ip, flux_inputs()), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="embeds_scaling: 'K\\+V' is supported by UNet and XLabs-Flux"):
        instantstyle.set_embeds_scaling(typed, "K+V")
    loaded = copy.deepcopy(model)  # loading with the type: IP weights only where it is non-zero
    instantstyle.load_ip_adapter(loaded, state, weight_type="composition", weight=0.6)
    held = {n for n, p in loaded.attn_processors.items() if len(getattr(p, "to_k_ip", ()) or ())}
    assert held == {f"single_transformer_blocks.{i}.attn.processor" for i in range(3)}
    torch.testing.assert_close(_run_dit(loaded, ip, flux_inputs()), _run_dit(ref, ip, flux_inputs()), atol=1e-12, rtol=1e-12)


def test_instantx_flux_refuses_embeds_scaling_before_touching_the_model():
    from helpers.dit_fixtures import instantx_flux_state, tiny_flux

    model = tiny_flux()
    before = dict(model.attn_processors)
    with pytest.raises(ValueError, match="embeds_scaling: instantx Flux IP layers take 'V only'"):
        instantstyle.load_ip_adapter(model, instantx_flux_state(model), embeds_scaling="K+V")
    assert all(model.attn_processors[k] is p for k, p in before.items())
    assert getattr(model, "encoder_hid_proj", None) is None


def test_sd3_weight_type_equals_per_block_scales():
    from helpers.dit_fixtures import embeds, sd3_inputs, sd3_state, tiny_sd3

    model = tiny_sd3()
    state = sd3_state(model)
    modules = [f"transformer_blocks.{i}" for i in range(3)]
    values = weights_for("sd3", "ease out", 0.8, modules=modules)
    typed, ref = copy.deepcopy(model), copy.deepcopy(model)
    instantstyle.load_ip_adapter(typed, state, weight_type="ease out", weight=0.8)
    instantstyle.load_ip_adapter(ref, state, target={"joint": [values[m] for m in modules]})
    ip = embeds(2, 1, 24)  # SD3: one tensor, not a list
    torch.testing.assert_close(_run_dit(typed, ip, sd3_inputs()), _run_dit(ref, ip, sd3_inputs()), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="not defined for sd3"):
        instantstyle.set_weight_type(typed, "style transfer")


def test_drop_in_with_zero_scales_does_the_targets_only_work():
    """diffusers' loader + a scale dict with 0 outside the style block + use_fused_processors:
    over a run's steps the image projection runs once and only the style block projects K/V."""
    unet = tiny_unet("sdxl")
    ref = diffusers_loaded(unet, [random_checkpoint(unet, seed=11)], {"up": {"block_0": [0.0, 1.0, 0.0]}})
    instantstyle.use_fused_processors(ref)
    calls = []
    for name, proc in ref.attn_processors.items():
        for lin in [*getattr(proc, "to_k_ip", ()), *getattr(proc, "to_v_ip", ())]:
            lin.register_forward_hook(lambda *a, n=name: calls.append(n))
    projections = []
    ref.encoder_hid_proj.image_projection_layers[0].register_forward_hook(lambda *a: projections.append(1))
    embeds = [image_embeds(2, 1, seed=12)]
    kwargs = unet_inputs(ref, batch=2, seed=0)
    added = dict(kwargs.pop("added_cond_kwargs"), image_embeds=embeds)
    with torch.no_grad():
        for t in (900, 800, 700):  # one run: falling timesteps
            ref(kwargs["sample"], torch.tensor(t), kwargs["encoder_hidden_states"], added_cond_kwargs=added)
    assert len(projections) == 1  # projected once per run, not per step
    assert calls and all(n.startswith("up_blocks.0.attentions.1.") for n in calls)
    # the style block's 3 layers, K and V, each step (a hooked linear bypasses the step cache)
    assert len(calls) == 3 * 2 * 3


@pytest.mark.parametrize("arch,swapped", [("sdxl", ("down_blocks.2.attentions.1.",)),
                                          ("sd15", ("down_blocks.2.attentions.0.", "down_blocks.2.attentions.1."))])
def test_style_transfer_precise_swaps_halves_at_the_composition_modules_only(arch, swapped):
    unet = tiny_unet(arch)
    instantstyle.load_ip_adapter(unet, random_checkpoint(unet), weight_type="style transfer precise", weight=0.9,
                                 composition_weight=1.2)
    flags = {n: p.swap_halves[0] for n, p in unet.attn_processors.items() if hasattr(p, "swap_halves")}
    assert flags and {n for n, f in flags.items() if f} == {n for n in flags if n.startswith(swapped)}
    # the swap is what the uncond half sees: the image tokens, and the cond half zeros
    proc = next(p for n, p in unet.attn_processors.items() if n.startswith(swapped[0]) and "attn2" in n)
    seen = []
    proc.to_k_ip[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    embeds = image_embeds(2, 1, seed=13)
    forward(unet, [embeds])
    states = seen[0]
    projected = unet.encoder_hid_proj([embeds])[0]
    torch.testing.assert_close(states[0], projected[1].reshape(states[0].shape))
    assert torch.count_nonzero(states[1]) == 0
    instantstyle.set_weight_type(unet, "style and composition")  # another type turns the swap off
    assert not any(p.swap_halves[0] for p in unet.attn_processors.values() if hasattr(p, "swap_halves"))
