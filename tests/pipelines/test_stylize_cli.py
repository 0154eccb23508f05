"""`instantstyle stylize` end to end on a tiny model folder, with and without ControlNet."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from instantstyle.cli import main
from instantstyle.pipelines import InstantStyle

from helpers.stylize import stylize_args as _args

def sidecar_of(image):
    return image.parent / (image.name + ".json")


STYLE_LAYERS = {f"up_blocks.0.attentions.1.transformer_blocks.{i}.attn2.processor" for i in range(3)}


@pytest.fixture
def ip_calls(monkeypatch):
    """Names of the attention layers whose IP projections ran, observed with forward hooks."""
    seen = set()
    original = InstantStyle._load

    def load_and_hook(self, *args, **kwargs):
        report = original(self, *args, **kwargs)
        for name, proc in self.pipe.unet.attn_processors.items():
            for linear in getattr(proc, "to_k_ip", []):
                linear.register_forward_hook(lambda *_, name=name: seen.add(name))
        return report

    monkeypatch.setattr(InstantStyle, "_load", load_and_hook)
    return seen


def test_stylize_writes_png_and_sidecar_and_injects_only_the_style_block(tiny_sdxl, tmp_path, ip_calls):
    out = tmp_path / "out" / "dog.png"
    assert main(_args(tiny_sdxl, out)) == 0
    image = Image.open(out)
    assert image.size == (32, 32)
    sidecar = json.loads(sidecar_of(out).read_text())
    assert set(sidecar["targets"]) == STYLE_LAYERS
    assert sidecar["settings"]["content_prompt"] == "a cat" and sidecar["settings"]["seed"] == 7
    assert sidecar["versions"]["torch"] == torch.__version__
    assert sidecar["timings"]["generate_s"] > 0
    assert sidecar["ip_params_held"] * 6 < sidecar["ip_params_all_layers"]  # 3 of the tiny UNet's 14 layers
    assert ip_calls == STYLE_LAYERS  # IP features reached exactly the targets, at run time


def test_same_seed_same_image_and_the_style_matters(tiny_sdxl, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(_args(tiny_sdxl, a)) == 0
    assert main(_args(tiny_sdxl, b)) == 0
    assert main(_args(tiny_sdxl, c, "--scale", "0")) == 0
    pa, pb, pc = (np.asarray(Image.open(p), dtype=np.int16) for p in (a, b, c))
    assert np.array_equal(pa, pb)
    assert np.abs(pa - pc).max() > 0  # scale 0 (no style) gives another image


def test_controlnet_with_canny_edges(tiny_sdxl, tmp_path, ip_calls):
    out = tmp_path / "cn.png"
    extra = ["--controlnet", str(tiny_sdxl / "controlnet"), "--control-image", str(tiny_sdxl / "control.png"), "--canny",
             "--preset", "style+layout"]
    assert main(_args(tiny_sdxl, out, *extra)) == 0
    sidecar = json.loads(sidecar_of(out).read_text())
    layout = {f"down_blocks.2.attentions.1.transformer_blocks.{i}.attn2.processor" for i in range(3)}
    assert set(sidecar["targets"]) == STYLE_LAYERS | layout
    assert ip_calls == STYLE_LAYERS | layout  # and never the ControlNet's own attention layers


@pytest.mark.parametrize(
    "change, message",
    [
        (("--ip-adapter", "missing.safetensors"), "--ip-adapter: no such file or folder"),
        (("--style", "missing.png"), "--style: no such file"),
        (("--model", "no-such-org/no-such-model"), "--model: could not load 'no-such-org/no-such-model'.*local folder"),
        (("--controlnet", "x"), "--controlnet and --control-image go together"),
    ],
)
def test_user_mistakes_are_one_line_errors(tiny_sdxl, tmp_path, capsys, monkeypatch, change, message):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never reach for a network here
    args = _args(tiny_sdxl, tmp_path / "x.png")
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err, re.S), err


def test_adapter_encoder_mismatch_is_explained(tiny_sdxl, tmp_path, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    other = tmp_path / "vit_h_like"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   image_size=32, patch_size=8, projection_dim=40)).save_pretrained(other)
    args = _args(tiny_sdxl, tmp_path / "x.png")
    args[args.index("--image-encoder") + 1] = str(other)
    assert main(args) == 2
    err = capsys.readouterr().err
    # refused at load time, before anything generates: the encoder's width against the adapter's projection
    assert "image_encoder:" in err and "projection_dim=40" in err and "projection_dim=24" in err and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) > 0 and "instantstyle: error:" in err


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["stylize", "--help"])
    assert "instantstyle stylize" in capsys.readouterr().out


def _sd15_args(root, out, *extra):
    return [
        "stylize", "--model", str(root / "model"), "--ip-adapter", str(root / "ip-adapter.bin"),
        "--image-encoder", str(root / "image_encoder"), "--style", str(root / "style.png"),
        "--prompt", "a dog", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out), *extra,
    ]


def test_sd15_with_a_separate_content_text_encoder(tiny_sd15, tmp_path, ip_calls):
    out = tmp_path / "sd15.png"
    extra = ["--content-prompt", "a cat", "--content-text-encoder", str(tiny_sd15 / "content_text_encoder")]
    assert main(_sd15_args(tiny_sd15, out, *extra)) == 0
    sidecar = json.loads(sidecar_of(out).read_text())
    assert sidecar["targets"] and all(t.startswith("up_blocks.1.") for t in sidecar["targets"])  # SD1.5 style preset
    assert ip_calls == set(sidecar["targets"])


def test_sd15_content_prompt_without_a_matching_text_encoder_is_explained(tiny_sd15, tmp_path, capsys):
    assert main(_sd15_args(tiny_sd15, tmp_path / "x.png", "--content-prompt", "a cat")) == 2
    err = capsys.readouterr().err
    assert "no text_encoder_2" in err and "Traceback" not in err
