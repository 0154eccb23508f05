"""Attention-map capture: per-token cross-attention maps, the unfused path only where
active, and heat-map images."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.ip_fixtures import tiny_unet
from helpers.method_cases import RefCrossCapture, run, with_processors

import instantstyle.processors.core.engine as compose
from instantstyle.kernels import check_close
from instantstyle.processors.methods import (
    AttentionMapCapture,
    apply_method,
    reset_steps,
    save_heatmaps,
)
from instantstyle.processors.methods.attention_maps import colorize


def _count_op_calls(monkeypatch):
    calls = []
    real = compose.decoupled_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(compose, "decoupled_attention", counting)
    return calls


def test_maps_match_reference_probabilities_at_chosen_steps(monkeypatch):
    unet = tiny_unet("sdxl")
    layers = [n for n in unet.attn_processors if n.startswith("up_blocks.0.attentions.1.") and n.endswith("attn2.processor")]
    ref, procs = with_processors(unet, RefCrossCapture, kind="attn2", only=set(layers))
    ours = copy.deepcopy(unet)
    base = run(ours)
    capture = AttentionMapCapture(target="style", steps=[1])
    apply_method(ours, capture)
    calls = _count_op_calls(monkeypatch)
    outs = []
    for step in range(3):
        outs.append(run(ours, seed=step))
        assert len(calls) == (0 if step == 1 else len(layers))  # unfused only while capturing
        calls.clear()
        run(ref, seed=step, dtype=torch.float64)
    check_close(outs[0], base, "fp32")  # capturing changes nothing
    assert sorted(capture.maps) == sorted((1, name) for name in layers)
    for name in layers:
        got = capture.maps[(1, name)]  # (B, tokens, h, w)
        expected = procs[name].probs[1]  # (B, N, tokens)
        b, tokens, h, w = got.shape
        assert (h, w) == (2, 2) and tokens == 7  # 8x8 latent, up_blocks.0 runs at 1/4
        check_close(got.reshape(b, tokens, h * w).transpose(1, 2), expected, "fp32")
    maps = capture.token_maps()
    assert maps.shape == (7, 2, 2)
    check_close(maps, torch.stack([capture.maps[(1, n)][-1] for n in layers]).mean(0), "fp32")
    reset_steps(ours)
    capture.clear()
    run(ours)
    run(ours)
    assert {step for step, _ in capture.maps} == {1}


def test_heatmaps_one_png_per_token(tmp_path):
    from PIL import Image

    unet = tiny_unet("sd15")
    capture = AttentionMapCapture(target=["up_blocks.1"])
    apply_method(unet, capture)
    run(unet, batch=2)
    maps = capture.token_maps()
    paths = save_heatmaps(maps, str(tmp_path / "maps"), tokens=["<|startoftext|>", "a</w>", "cat</w>"], size=64)
    assert [p.split("/")[-1] for p in paths] == ["00_startoftext.png", "01_a.png", "02_cat.png"]
    image = Image.open(paths[2])
    assert image.size == (64, 64) and image.mode == "RGB"
    # the hottest pixel of the token's map is the brightest of the image
    heat = torch.nn.functional.interpolate(maps[2][None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    pixels = torch.from_numpy(np.asarray(image).astype("int64")).sum(-1)
    assert pixels.flatten()[heat.flatten().argmax()] == pixels.max() and pixels.flatten()[heat.flatten().argmin()] == pixels.min()
    assert colorize(torch.tensor([[0.0, 0.5, 1.0]])).tolist() == [[[0, 0, 4], [188, 55, 84], [252, 255, 164]]]
    overlay = save_heatmaps(maps[:1], str(tmp_path / "over"), image=Image.new("RGB", (40, 30)))
    assert Image.open(overlay[0]).size == (40, 30)
    with pytest.raises(ValueError, match=r"maps: expected a \(tokens, h, w\) tensor"):
        save_heatmaps(maps[0], str(tmp_path))
    with pytest.raises(TypeError, match="steps: expected None or an iterable"):
        AttentionMapCapture(steps=3)
    with pytest.raises(ValueError, match="no captured maps match"):
        capture.token_maps(steps=[99])
