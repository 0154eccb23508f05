"""Differentiable attention maps and Attend-and-Excite: gradients against the backward
written out by hand, the loss and latent update against a float64 by-hand
implementation on a tiny SDXL UNet, with IP-Adapter in the same call, and bad input."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from helpers.attend_excite_reference import (
    by_hand_processors,
    excite_by_hand,
    softmax_by_hand,
)
from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet, unet_inputs
from helpers.sdxl_pipelines import build_tiny_sdxl
from helpers.unet_reference import diffusers_loaded

from instantstyle.kernels import check_close
from instantstyle.kernels.tolerances import check_grad_close
from instantstyle.loaders import load_ip_adapter
from instantstyle.processors.core import engine
from instantstyle.processors.core.engine import LayerInputs, attend
from instantstyle.processors.methods import (
    AttendAndExcite,
    AttentionMapCapture,
    EditingMethod,
    apply_method,
)

STYLE = {"up": {"block_0": [0.0, 1.0, 0.0]}}  # SDXL "style" as a set_ip_adapter_scale dict
GRAD_PRECISION = {torch.float64: "fp64", torch.float32: "fp32"}


class Echo(EditingMethod):
    """A decoupled stream (own softmax, own scale), as IP-Adapter adds one."""

    name = "echo"
    kind = "cross"

    def __init__(self, k, v, scale):
        super().__init__()
        self.k, self.v, self.scale = k, v, scale

    def streams(self, call):
        return [(self.k, self.v, self.scale)]


def _leaf(*shape, g, dtype):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_on_maps_adds_the_softmax_term_to_dS(dtype):
    # awkward shapes: 3 rows, a 3x4 query grid, 3 heads of 5, 7 text keys, 2 IP keys
    B, (h, w), H, D, Lt, Li = 3, (3, 4), 3, 5, 7, 2
    g = torch.Generator().manual_seed(11)
    q, k, v = _leaf(B, h * w, H, D, g=g, dtype=dtype), _leaf(B, Lt, H, D, g=g, dtype=dtype), _leaf(B, Lt, H, D, g=g, dtype=dtype)
    ik, iv = _leaf(B, Li, H, D, g=g, dtype=dtype), _leaf(B, Li, H, D, g=g, dtype=dtype)
    d_out = torch.randn(B, h * w, H, D, generator=g, dtype=torch.float64)
    g_maps = torch.randn(B, Lt, h, w, generator=g, dtype=torch.float64)
    capture = AttentionMapCapture(differentiable=True)
    layer = LayerInputs(q, k, v, None, None, None, [], None, (B, h * w, H * D))
    info = SimpleNamespace(step=0, timestep=None, sample_size=(2 * h, 2 * w))
    out = attend(layer, [(Echo(ik, iv, 0.7), 1.0), (capture, 1.0)], site="layer", info=info)
    (maps,) = capture.maps.values()
    assert maps.shape == (B, Lt, h, w) and maps.requires_grad and maps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss = (out.double() * d_out).sum() + (maps.double() * g_maps).sum()
    grads = torch.autograd.grad(loss, [q, k, v, ik, iv])

    # the backward by hand, per (row, head), in float64 (training-facts: attention guidance)
    Q, K, V, IK, IV = (t.detach().double().transpose(1, 2) for t in (q, k, v, ik, iv))  # (B, H, L, D)
    dO = d_out.transpose(1, 2)
    tau = D ** -0.5
    P = softmax_by_hand(tau * Q @ K.transpose(-1, -2))
    P1 = softmax_by_hand(tau * Q @ IK.transpose(-1, -2))
    G = (g_maps.reshape(B, Lt, h * w).transpose(1, 2) / H)[:, None]  # head average: each head gets 1/H
    D0, D1 = (dO * (P @ V)).sum(-1, keepdim=True), (dO * (P1 @ IV)).sum(-1, keepdim=True)
    dS0 = P * (dO @ V.transpose(-1, -2) - D0) + P * (G - (P * G).sum(-1, keepdim=True))
    dS1 = 0.7 * P1 * (dO @ IV.transpose(-1, -2) - D1)
    expected = [tau * (dS0 @ K + dS1 @ IK), tau * dS0.transpose(-1, -2) @ Q, P.transpose(-1, -2) @ dO,
                tau * dS1.transpose(-1, -2) @ Q, 0.7 * P1.transpose(-1, -2) @ dO]
    for name, got, ref in zip(["dq", "dk", "dv", "dk_ip", "dv_ip"], grads, expected):
        check_grad_close(name, got, ref.transpose(1, 2), GRAD_PRECISION[dtype])

    # without the mode, a map keeps no graph and lives on the CPU as float32
    plain = AttentionMapCapture()
    out = attend(layer, [(plain, 1.0)], site="layer", info=info)
    (kept,) = plain.maps.values()
    assert out.requires_grad and not kept.requires_grad and kept.grad_fn is None and kept.dtype == torch.float32
    check_close(kept, maps.detach(), "fp32")


def _sdxl_call(unet, batch, seed=0, size=(8, 12), dtype=torch.float32):
    kwargs = unet_inputs(unet, batch=batch, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    kwargs["sample"] = torch.randn(batch, 4, *size, generator=g)
    return {k: ({kk: vv.to(dtype) for kk, vv in v.items()} if isinstance(v, dict) else
                v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_to_latents_matches_float64_by_hand(dtype):
    unet = tiny_unet("sdxl", dtype=dtype)
    ref = copy.deepcopy(unet).double()
    procs = by_hand_processors(ref, size=2 * 3, only=["down_blocks.2", "up_blocks.0"])  # 2x3 maps of the 8x12 latent
    capture = AttentionMapCapture(target=["down_blocks.2", "up_blocks.0"], differentiable=True)
    apply_method(unet, capture)
    kwargs = _sdxl_call(unet, batch=2, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    d_out = torch.randn(2, 4, 8, 12, generator=g, dtype=torch.float64)
    g_maps = torch.randn(2, 7, 2, 3, generator=g, dtype=torch.float64)

    def grad_of(model, latents, maps_of):
        latents = latents.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(latents, kwargs["timestep"], encoder_hidden_states=kwargs["encoder_hidden_states"].to(latents.dtype),
                        added_cond_kwargs={k: v.to(latents.dtype) for k, v in kwargs["added_cond_kwargs"].items()}).sample
            loss = (out.double() * d_out).sum() + sum((m.double() * g_maps).sum() for m in maps_of())
            return torch.autograd.grad(loss, [latents])[0]

    ours = grad_of(unet, kwargs["sample"], lambda: list(capture.maps.values()))
    chosen = list(procs.values())

    def ref_maps():
        maps = [p.probs[-1].mean(1).transpose(1, 2).reshape(2, 7, 2, 3) for p in chosen]
        for p in procs.values():
            p.probs.clear()
        return maps

    expected = grad_of(ref, kwargs["sample"].double(), ref_maps)
    assert len(capture.maps) == len(chosen) == 15  # down_blocks.2: 2 x 3 layers, up_blocks.0: 3 x 3
    check_grad_close("d latents", ours, expected, GRAD_PRECISION[dtype])


def _scheduler(steps=6):
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    return scheduler


def _by_hand(ref, kwargs, rows, embeds=None):
    """``call(sample, timestep, row)`` on the conditional inputs of ``row`` (CFG: last half)."""
    def call(sample, timestep, row):
        r = rows + row
        added = {k: v[r:r + 1].double() for k, v in kwargs["added_cond_kwargs"].items()}
        if embeds is not None:
            added["image_embeds"] = [embeds[r:r + 1].double()]
        ref(sample, timestep, encoder_hidden_states=kwargs["encoder_hidden_states"][r:r + 1].double(), added_cond_kwargs=added)
    return call


@pytest.mark.parametrize("threshold", [None, 0.45])  # 0.45: rows stop refining at different iterations
def test_excite_step_matches_float64_by_hand(threshold):
    unet = tiny_unet("sdxl")
    ref = copy.deepcopy(unet).double()
    procs = by_hand_processors(ref, size=4 * 6)
    indices = [[2, 5], [1, 3, 4]]  # one list per prompt
    excite = AttendAndExcite(indices, resolution=(4, 6), steps=[2], thresholds={2: threshold} if threshold else {},
                             max_refinement_steps=6)
    apply_method(unet, excite)
    kwargs = _sdxl_call(unet, batch=4)  # CFG: 2 unconditional rows, then 2 conditional ones
    with torch.no_grad():
        unet(**kwargs)  # the pipeline's call at step 1 (recorded)
    scheduler = _scheduler()
    scheduler._step_index = 2  # where it stands after its step 1
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(9))
    pipe = SimpleNamespace(unet=unet, scheduler=scheduler)
    with torch.no_grad():
        got = excite(pipe, 1, scheduler.timesteps[1], {"latents": latents})["latents"]
    t = scheduler.timesteps[2]
    sigma = float(scheduler.sigmas[2])
    step_size = 20.0 * math.sqrt(torch.linspace(1.0, 0.5, 6, dtype=torch.float64)[2].item())
    expected, losses = excite_by_hand(ref, procs, latents.double(), t.double(), _by_hand(ref, kwargs, 2), indices, (4, 6),
                                      step_size, scale=1 / math.sqrt(sigma ** 2 + 1), threshold=threshold, max_refinement_steps=6)
    assert not torch.equal(got, latents) and got.dtype == latents.dtype
    check_close(excite.losses[2], torch.tensor(losses), "fp32")
    check_close(got - latents, expected - latents.double(), "fp32")
    # steps not chosen, and the last step, leave the latents alone
    assert excite(pipe, 2, t, {"latents": latents})["latents"] is latents
    assert excite(pipe, 5, t, {"latents": latents})["latents"] is latents


def test_composes_with_ip_adapter_in_the_same_call():
    unet = tiny_unet("sdxl")
    ckpt = random_checkpoint(unet, seed=1)
    ref = diffusers_loaded(unet, [ckpt], STYLE).double()
    procs = by_hand_processors(ref, size=2 * 3, with_ip=True, only=["up_blocks.0.attentions.1."])  # style, at 2x3
    ours = copy.deepcopy(unet)
    load_ip_adapter(ours, ckpt, target="style")
    excite = AttendAndExcite([3, 4], target="style", steps=[3])  # default resolution: latent / 4 = 2x3
    apply_method(ours, excite)
    bare = copy.deepcopy(unet)
    bare_excite = AttendAndExcite([3, 4], target="style", steps=[3])
    apply_method(bare, bare_excite)
    kwargs = _sdxl_call(unet, batch=2)
    embeds = image_embeds(2, 1, seed=3)
    scheduler = _scheduler()
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(4))
    t = scheduler.timesteps[3]
    results = []
    for model, method in ((ours, excite), (bare, bare_excite)):
        added = dict(kwargs["added_cond_kwargs"], image_embeds=[embeds])
        with torch.no_grad():
            model(kwargs["sample"], scheduler.timesteps[2], encoder_hidden_states=kwargs["encoder_hidden_states"], added_cond_kwargs=added)
            results.append(method.excite(model, latents, t, 15.0, step=3))
    expected, losses = excite_by_hand(ref, procs, latents.double(), t.double(), _by_hand(ref, kwargs, 1, embeds), [[3, 4]], (2, 3), 15.0)
    check_close(excite.losses[3], torch.tensor(losses), "fp32")
    check_close(results[0] - latents, expected - latents.double(), "fp32")
    # the IP stream is in the guidance pass: without the adapter the update differs
    assert (results[1] - results[0]).abs().max() > 1e-3 * (expected - latents.double()).abs().max()


def test_guidance_pass_leaves_the_step_count_alone():
    unet = tiny_unet("sdxl")
    maps = AttentionMapCapture(target="style", steps=[2])
    excite = AttendAndExcite([2], steps=[1, 2], resolution=(4, 6))
    apply_method(unet, maps)
    apply_method(unet, excite)
    kwargs = _sdxl_call(unet, batch=2)
    scheduler = _scheduler()
    pipe = SimpleNamespace(unet=unet, scheduler=scheduler)
    latents = kwargs["sample"][1:]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps[:3]):
            unet(torch.cat([latents] * 2), t, encoder_hidden_states=kwargs["encoder_hidden_states"],
                 added_cond_kwargs=kwargs["added_cond_kwargs"])
            latents = excite(pipe, i, t, {"latents": latents})["latents"]
    assert sorted(excite.losses) == [1, 2]
    assert {step for step, _ in maps.maps} == {2}  # steps as the pipeline counts them
    assert all(m.shape[0] == 2 for m in maps.maps.values())  # the pipeline's call came last
    assert all(not m.requires_grad for m in excite.maps.values())  # no graph kept after the pass


def test_bad_arguments_one_line_errors():
    for bad, match in [({"token_indices": []}, "token_indices: expected a non-empty list"),
                       ({"token_indices": [0, 2]}, "token_indices: expected a non-empty list of token positions >= 1"),
                       ({"token_indices": [[1], "a"]}, "token_indices"),
                       ({"token_indices": [1], "steps": [0, 1]}, r"steps: expected step indices >= 1"),
                       ({"token_indices": [1], "resolution": (4,)}, "resolution: expected None, a positive int"),
                       ({"token_indices": [1], "kernel_size": 2}, "kernel_size: expected an odd positive int"),
                       ({"token_indices": [1], "thresholds": {3: 1.5}}, r"thresholds: expected thresholds in \(0, 1\]"),
                       ({"token_indices": [1], "scale_factor": -1}, "scale_factor: expected a positive number")]:
        with pytest.raises(ValueError, match=match) as info:
            AttendAndExcite(**bad)
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="steps: expected an iterable"):
        AttendAndExcite([1], steps=3)
    with pytest.raises(TypeError, match="differentiable: expected True or False"):
        AttentionMapCapture(differentiable=1)

    unet = tiny_unet("sdxl")
    excite = AttendAndExcite([2, 6], resolution=(4, 6))  # 7 text tokens: positions 1..5 only
    apply_method(unet, excite)
    latents = torch.randn(1, 4, 8, 12)
    with pytest.raises(ValueError, match="no UNet call recorded"):
        excite.excite(unet, latents, torch.tensor(500), 1.0)
    kwargs = _sdxl_call(unet, batch=2)
    with torch.no_grad():
        unet(**kwargs)
    with pytest.raises(ValueError, match=r"token_indices: expected indices in 1\.\.5 .* got 6$"):
        excite.excite(unet, latents, torch.tensor(500), 1.0)
    with pytest.raises(ValueError, match="latents: expected"):
        excite.excite(unet, torch.randn(3, 4, 8, 12), torch.tensor(500), 1.0)
    wrong = AttendAndExcite([2], resolution=(5, 5), name="wrong")
    apply_method(unet, wrong)
    with torch.no_grad():
        unet(**kwargs)
    with pytest.raises(ValueError, match=r"resolution: no targeted cross-attention layer of wrong runs at \(5, 5\)"):
        wrong.excite(unet, latents, torch.tensor(500), 1.0)


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-excite"))


def test_instantstyle_pipeline_call_with_the_callback(tiny_sdxl_dir, monkeypatch):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from instantstyle.pipelines import InstantStyle

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir / "model")
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_sdxl_dir / "image_encoder")
    style = InstantStyle(pipe, tiny_sdxl_dir / "ip-adapter.safetensors", target="style", image_encoder=encoder,
                         image_processor=CLIPImageProcessor.from_pretrained(tiny_sdxl_dir / "image_encoder"))
    excite = AttendAndExcite([2, 4], target="style", steps=[1, 2])  # 32 px -> 16x16 latents -> 4x4 maps
    maps = AttentionMapCapture(target="style", steps=[2])
    apply_method(pipe, excite)
    apply_method(pipe, maps)
    streams = []  # IP streams of every layer call that materialises maps during a guidance pass
    real = engine.torch_decoupled_attention

    def spy(inputs, *args, **kwargs):
        if excite._size is not None and kwargs.get("keep_probs"):
            streams.append(len(inputs.ip_k))
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(engine, "torch_decoupled_attention", spy)
    run = lambda **kw: style("a cat and a frog", [Image.open(tiny_sdxl_dir / "style.png")], num_inference_steps=4,
                             height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images
    guided = run(callback_on_step_end=excite)
    assert sorted(excite.losses) == [1, 2] and all(loss.shape == (1,) for loss in excite.losses.values())
    assert streams and set(streams) == {1}  # the style layers' IP stream is in the guidance pass
    assert {step for step, _ in maps.maps} == {2} and all(m.shape[0] == 2 for m in maps.maps.values())
    plain = run()
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)
