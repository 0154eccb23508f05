"""``instantstyle video`` on the other Wan-family pipelines with the same image branch:
SkyReels-V2 I2V and ChronoEdit, built from config as diffusers' tests build them.  The image
branch's scale reaches each one exactly as on Wan (scale 0 equals diffusers with every
``add_v_proj`` zeroed), and the sidecar names the pipeline."""
import json

import numpy as np
import pytest
from helpers.wan_pipelines import FAMILIES, as_uint8_frames, diffusers_frames, save_tiny_wan_i2v
from PIL import Image

from instantstyle.cli import main
from instantstyle.pipelines import video_cli

FAST = ["--frames", "5", "--height", "16", "--width", "32", "--steps", "2", "--device", "cpu", "--threads", "1"]
OTHERS = [family for family in FAMILIES if family != "wan"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-wan-families")
    for family in OTHERS:
        save_tiny_wan_i2v(root / family, family=family)
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(root / "ref.png")
    return root


@pytest.mark.parametrize("family", OTHERS)
def test_scale_reaches_the_image_branch(root, tmp_path, monkeypatch, family):
    captured = []
    original = video_cli.save_video
    monkeypatch.setattr(video_cli, "save_video", lambda video, path, fps: (captured.append(as_uint8_frames(video)),
                                                                          original(video, path, fps)))
    for name, scale in (("off", "0"), ("on", "1")):
        assert main(["video", "--model", str(root / family), "--image", str(root / "ref.png"), "--prompt", "a red fox",
                     "--out", str(tmp_path / f"{name}.gif"), "--seed", "2", "--scale", scale, *FAST]) == 0
    off, on = captured
    image = Image.open(root / "ref.png").convert("RGB")
    assert np.abs(off - diffusers_frames(root / family, image, seed=2, zero_image_branch=True)).max() <= 1
    assert np.abs(on - diffusers_frames(root / family, image, seed=2)).max() <= 1
    assert np.abs(on - off).max() > 1  # the image branch matters, so the test can fail
    sidecar = json.loads((tmp_path / "off.gif.json").read_text())
    assert sidecar["pipeline"] == FAMILIES[family][0]
    assert set(sidecar["image_scales"].values()) == {0.0}
