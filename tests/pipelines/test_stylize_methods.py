"""`instantstyle stylize --method style-aligned`: a batch of prompts sharing the first
image's style, on the tiny SDXL model folder."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from helpers.stylize import pixels
from instantstyle.cli import main

PROMPTS = ["a red house", "a blue car", "a green tree"]


def _args(root, out, prompts, *extra):
    args = ["stylize", "--method", "style-aligned", "--model", str(root / "model"), "--steps", "2",
            "--height", "32", "--width", "32", "--seed", "3", "--out", str(out), *extra]
    for p in prompts:
        args += ["--prompt", p]
    return args


def test_style_aligned_batch_shares_the_first_images_style(tiny_sdxl, tmp_path):
    out = tmp_path / "batch" / "toys.png"
    assert main(_args(tiny_sdxl, out, PROMPTS, "--keys-scale", "0.9")) == 0
    paths = [tmp_path / "batch" / f"toys-{i}.png" for i in range(3)]
    assert all(Image.open(p).size == (32, 32) for p in paths)
    sidecar = json.loads((out.parent / (out.name + ".json")).read_text())
    assert sidecar["method"] == "style-aligned" and sidecar["images"] == [str(p) for p in paths]
    assert sidecar["settings"]["prompt"] == PROMPTS and sidecar["settings"]["keys_scale"] == 0.9
    assert sidecar["targets"] and all(t.endswith("attn1.processor") for t in sidecar["targets"])

    # the reference attends to itself whatever follows it: the same first image in another batch
    pair = tmp_path / "pair.png"
    assert main(_args(tiny_sdxl, pair, [PROMPTS[0], PROMPTS[2]], "--keys-scale", "0.9")) == 0
    alone = tmp_path / "pair-0.png"
    assert np.abs(pixels(paths[0]) - pixels(alone)).max() <= 1
    second = tmp_path / "second.png"
    assert main(_args(tiny_sdxl, second, [PROMPTS[0], PROMPTS[1]], "--keys-scale", "0.9", "--only-self-level", "0.5")) == 0
    assert np.abs(pixels(tmp_path / "second-1.png") - pixels(paths[1])).max() > 0  # sharing fewer layers changes it
    # the GroupNorms share the reference's statistics by default; --no-shared-norms keeps their own
    own = tmp_path / "own.png"
    assert main(_args(tiny_sdxl, own, [PROMPTS[0], PROMPTS[1]], "--keys-scale", "0.9", "--no-shared-norms")) == 0
    assert json.loads((own.parent / (own.name + ".json")).read_text())["settings"]["no_shared_norms"] is True
    assert sidecar["settings"]["no_shared_norms"] is False
    assert np.abs(pixels(tmp_path / "own-0.png") - pixels(alone)).max() <= 1  # the reference: unchanged either way
    assert np.abs(pixels(tmp_path / "own-1.png") - pixels(paths[1])).max() > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "style-aligned", "--style", "x.png"], "--style: not used by --method style-aligned"),
        (["--method", "style-aligned", "--only-self-level", "2"], "--only-self-level: expected a fraction in \\[0, 1\\], got 2.0"),
        (["--method", "instantstyle"], "--ip-adapter: required with --method instantstyle"),
        (["--method", "instantstyle", "--no-shared-norms"], "--no-shared-norms: used only by --method style-aligned"),
    ],
)
def test_method_flag_mistakes_are_one_line_errors(tiny_sdxl, tmp_path, capsys, extra, message):
    args = ["stylize", "--model", str(tiny_sdxl / "model"), "--prompt", "a", "--out", str(tmp_path / "x.png"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(message, err), err


def test_instantstyle_takes_one_prompt(tiny_sdxl, tmp_path, capsys):
    args = ["stylize", "--model", str(tiny_sdxl / "model"), "--ip-adapter", str(tiny_sdxl / "ip-adapter.safetensors"),
            "--image-encoder", str(tiny_sdxl / "image_encoder"), "--style", str(tiny_sdxl / "style.png"),
            "--prompt", "a", "--prompt", "b", "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    assert "--prompt: --method instantstyle takes one prompt, got 2" in capsys.readouterr().err
