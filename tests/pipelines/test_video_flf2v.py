"""First-last-frame (FLF2V) Wan checkpoints from the command line: ``--last-image`` reaches the
pipeline exactly as diffusers takes it, and a checkpoint/flag mismatch (which diffusers reports
as a shape error deep in the transformer) is one line before the weights load."""
import json

import numpy as np
import pytest
import torch
from helpers.wan_pipelines import as_uint8_frames, diffusers_frames, save_tiny_wan_i2v
from PIL import Image

from instantstyle.cli import main
from instantstyle.pipelines import video_cli

FAST = ["--frames", "5", "--height", "16", "--width", "32", "--steps", "2", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-wan-flf2v")
    save_tiny_wan_i2v(root / "flf2v", flf2v=True)
    save_tiny_wan_i2v(root / "i2v")
    rng = np.random.default_rng(8)
    for name in ("first", "last"):
        Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root


def _args(root, model, out, *extra):
    return ["video", "--model", str(root / model), "--image", str(root / "first.png"), "--prompt", "a red fox",
            "--out", str(out), *FAST, *extra]


def _diffusers(root, seed, last=True, zero_image_branch=False):
    """diffusers' FLF2V run from the same first frame, with the last frame (or the first again)."""
    return diffusers_frames(root / "flf2v", Image.open(root / "first.png").convert("RGB"), seed=seed,
                            zero_image_branch=zero_image_branch,
                            last_image=Image.open(root / ("last.png" if last else "first.png")).convert("RGB"))


@pytest.fixture
def captured(monkeypatch):
    """The frames the CLI writes, and the image tokens every transformer call receives (the tiny
    VAE barely shows the last frame in pixels, so the tokens are where it is checked)."""
    from diffusers import WanTransformer3DModel

    seen = {"frames": [], "image_tokens": []}
    save_original, forward_original = video_cli.save_video, WanTransformer3DModel.forward

    def save(video, path, fps):
        seen["frames"].append(as_uint8_frames(video))
        return save_original(video, path, fps)

    def forward(self, *args, **kwargs):
        seen["image_tokens"].append(kwargs["encoder_hidden_states_image"].detach().clone())
        return forward_original(self, *args, **kwargs)

    monkeypatch.setattr(video_cli, "save_video", save)
    monkeypatch.setattr(WanTransformer3DModel, "forward", forward)
    return seen


def test_last_image_reaches_the_pipeline_as_diffusers_takes_it(root, tmp_path, captured):
    assert main(_args(root, "flf2v", tmp_path / "v.gif", "--last-image", str(root / "last.png"), "--seed", "3")) == 0
    (ours,), cli_tokens = captured["frames"], list(captured["image_tokens"])
    captured["image_tokens"].clear()
    assert np.abs(ours - _diffusers(root, 3)).max() <= 1  # float32 paths differ; a frame rounds to uint8
    reference_tokens = list(captured["image_tokens"])
    captured["image_tokens"].clear()
    _diffusers(root, 3, last=False)
    first_only_tokens = captured["image_tokens"]
    assert len(cli_tokens) == len(reference_tokens) == 4  # 2 steps x CFG halves
    assert cli_tokens[0].shape == (2, 17, 4)  # both frames' CLIP tokens (the transformer views them as 1 x 34)
    assert all(torch.equal(a, b) for a, b in zip(cli_tokens, reference_tokens))
    assert not torch.equal(cli_tokens[0], first_only_tokens[0])  # the last frame matters: the test can fail
    assert json.loads((tmp_path / "v.gif.json").read_text())["settings"]["last_image"] == str(root / "last.png")


def test_scale_zero_on_flf2v_equals_diffusers_with_add_v_proj_zeroed(root, tmp_path, captured):
    assert main(_args(root, "flf2v", tmp_path / "v.gif", "--last-image", str(root / "last.png"), "--seed", "4",
                      "--scale", "0")) == 0
    assert np.abs(captured["frames"][0] - _diffusers(root, 4, zero_image_branch=True)).max() <= 1


@pytest.mark.parametrize("model, last, message", [
    ("flf2v", False, "is a first-last-frame (FLF2V) checkpoint; give its last frame too"),
    ("i2v", True, "only first-last-frame (FLF2V) checkpoints take a last frame"),
])
def test_a_mismatch_is_one_line_before_the_weights_load(root, tmp_path, capsys, monkeypatch, model, last, message):
    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", None)  # loading would raise TypeError
    extra = ["--last-image", str(root / "last.png")] if last else []
    assert main(_args(root, model, tmp_path / "v.gif", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("instantstyle: error: --last-image: ") and message in err[0], err
    assert not list(tmp_path.iterdir())


def test_stylize_batch_takes_first_and_last_frame_per_row(root, tmp_path, capsys):
    manifest = tmp_path / "jobs.jsonl"
    rows = [{"prompt": "a red fox", "style": [str(root / "first.png"), str(root / "last.png")], "name": "both",
             "seed": 3},
            {"prompt": "a red fox", "style": str(root / "first.png"), "name": "first-only"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    code = main(["stylize-batch", str(manifest), "--out", str(out), "--model", str(root / "flf2v"), "--format", "gif",
                 "--fps", "10", "--guidance", "5", *FAST])
    assert code == 1  # one row failed
    with Image.open(out / "both.gif") as gif:
        assert gif.n_frames == 5
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (1, 1)
    failed, = [r for r in summary["results"] if r["status"] == "failed"]
    assert "takes 2 image(s) (the first frame and the last frame), got 1" in failed["reason"]
    assert not (out / "first-only.gif").exists()
