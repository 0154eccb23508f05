"""``instantstyle video``: a tiny Wan 2.1 I2V pipeline folder (built from config, saved like a
user's) -> GIF/MP4 + sidecar, the image branch scaled per block; one-line errors before loading."""
import importlib.util
import json
import os

import numpy as np
import pytest
from helpers.hub_cache import make_hub_cache
from helpers.wan_pipelines import as_uint8_frames, diffusers_frames, save_tiny_wan_i2v
from PIL import Image

from instantstyle.cli import main
from instantstyle.pipelines import video_cli

FAST = ["--frames", "5", "--height", "16", "--width", "32", "--steps", "2", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-wan")
    save_tiny_wan_i2v(root / "model")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(root / "ref.png")  # not the video size
    return root


def _args(root, out, *extra):
    return ["video", "--model", str(root / "model"), "--image", str(root / "ref.png"), "--prompt", "a red fox",
            "--out", str(out), *FAST, *extra]


@pytest.fixture
def captured(monkeypatch):
    """The frames the CLI writes, as uint8 arrays (before GIF's palette quantises them)."""
    frames = []
    original = video_cli.save_video

    def save(video, path, fps):
        frames.append(as_uint8_frames(video))
        return original(video, path, fps)

    monkeypatch.setattr(video_cli, "save_video", save)
    return frames


def test_gif_frames_size_sidecar_and_json(wan_dir, tmp_path, capsys):
    out = tmp_path / "fox.gif"
    assert main(_args(wan_dir, out, "--json", "--fps", "10", "--seed", "11", "--scale", "0.5", "--target", "blocks.1",
                      "--start-at", "0.0", "--end-at", "0.5")) == 0
    with Image.open(out) as gif:
        assert (gif.n_frames, gif.size) == (5, (32, 16))
        assert gif.info["duration"] == 100  # ms; GIF stores centiseconds
    sidecar = json.loads((tmp_path / "fox.gif.json").read_text())
    printed = json.loads(capsys.readouterr().out)
    assert printed["sidecar"] == str(tmp_path / "fox.gif.json")
    assert {k: printed[k] for k in sidecar} == sidecar
    assert (sidecar["frames"], sidecar["fps"], sidecar["seed"], sidecar["size"]) == (5, 10.0, 11, [32, 16])
    assert sidecar["image_scales"] == {"blocks.0.attn2.processor": 1.0, "blocks.1.attn2.processor": 0.5}
    assert sidecar["settings"]["end_at"] == 0.5 and sidecar["settings"]["target"] == ["blocks.1"]
    assert sidecar["backend"] == "auto" and sidecar["pipeline"] == "WanImageToVideoPipeline"
    assert {"torch", "diffusers", "instantstyle"} <= set(sidecar["versions"])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".instantstyle-tmp-")]


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None, reason="needs imageio-ffmpeg (instantstyle[video])")
def test_mp4_has_every_frame(wan_dir, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "fox.mp4"
    assert main(_args(wan_dir, out)) == 0
    video = iio.imread(out)
    assert video.shape == (5, 16, 32, 3)
    assert json.loads((tmp_path / "fox.mp4.json").read_text())["frames"] == 5


def _zeroed_reference(root, seed):
    return diffusers_frames(root / "model", Image.open(root / "ref.png").convert("RGB"), seed=seed, zero_image_branch=True)


def test_scale_zero_everywhere_equals_diffusers_with_add_v_proj_zeroed(wan_dir, tmp_path, captured):
    ref = _zeroed_reference(wan_dir, seed=5)
    assert main(_args(wan_dir, tmp_path / "off.gif", "--seed", "5", "--scale", "0")) == 0
    assert main(_args(wan_dir, tmp_path / "on.gif", "--seed", "5")) == 0
    off, on = captured
    assert np.abs(off - ref).max() <= 1  # float32 paths differ; a frame rounds to uint8
    assert np.abs(on - ref).max() > 1  # and the image branch matters, so the test can fail


def test_per_block_list_scale(wan_dir, tmp_path, captured):
    ref = _zeroed_reference(wan_dir, seed=6)
    assert main(_args(wan_dir, tmp_path / "list.gif", "--seed", "6", "--scale", "0,0")) == 0
    assert np.abs(captured[0] - ref).max() <= 1


@pytest.mark.parametrize("change, message", [
    (["--frames", "8"], "--frames: Wan makes 4k+1 frames"),
    (["--frames", "0"], "--frames: Wan makes 4k+1 frames"),
    (["--height", "24"], "--height: expected a positive multiple of 16"),
    (["--scale", "a,b"], "--scale: expected a number or a comma-separated list"),
    (["--scale", "1,0", "--target", "blocks.0"], "--scale / --target"),
    (["--start-at", "0.6", "--end-at", "0.5"], "--start-at/--end-at"),
    (["--image", "missing.png"], "--image: no such file"),
])
def test_mistakes_are_one_line_before_loading(tmp_path, capsys, change, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "ref.png")
    args = ["video", "--model", str(tmp_path / "no-such-model"), "--image", str(tmp_path / "ref.png"), "--prompt", "x",
            "--out", str(tmp_path / "v.gif"), *FAST]
    for i in range(0, len(change), 2):
        if change[i] == "--image":
            args[args.index("--image") + 1] = str(tmp_path / change[i + 1])
        else:
            args += change[i:i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("instantstyle: error: ") and message in err[0], err


@pytest.mark.parametrize("out, message", [("v.png", "expected a video name ending in .gif or .mp4"),
                                          ("v", "expected a video name ending in .gif or .mp4")])
def test_output_extension_is_checked_first(wan_dir, tmp_path, capsys, out, message):
    args = _args(wan_dir, tmp_path / out)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and message in err[0]
    assert os.listdir(tmp_path) == []


def test_mp4_without_its_writer_names_the_extra(wan_dir, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # an import of it raises ImportError
    args = _args(wan_dir, tmp_path / "v.mp4")
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")  # proves it is checked before loading
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "instantstyle[video]"' in err[0]


def test_without_ftfy_names_the_extra_before_loading(wan_dir, tmp_path, capsys, monkeypatch):
    """diffusers' Wan pipelines would die on the first prompt with ``NameError: ftfy``."""
    import sys

    import diffusers

    monkeypatch.setitem(sys.modules, "ftfy", None)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", None)  # loading would raise TypeError
    assert main(_args(wan_dir, tmp_path / "v.gif")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ftfy" in err[0] and 'pip install "instantstyle[video]"' in err[0]
    assert os.listdir(tmp_path) == []


def test_a_model_without_an_image_branch_is_refused(wan_dir, tmp_path, capsys):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(str(wan_dir / "model"))
    for block in pipe.transformer.blocks:  # as a Wan 2.2 / T2V transformer: no add_k_proj
        del block.attn2.add_k_proj, block.attn2.add_v_proj
        block.attn2.added_kv_proj_dim = None
    pipe.transformer.register_to_config(added_kv_proj_dim=None)
    pipe.save_pretrained(tmp_path / "t2v")
    args = _args(wan_dir, tmp_path / "v.gif")
    args[args.index("--model") + 1] = str(tmp_path / "t2v")
    assert main(args) == 2
    assert "expected a Wan I2V/FLF2V pipeline" in capsys.readouterr().err


def test_hub_id_from_the_local_cache(wan_dir, tmp_path, offline_cache, captured):
    model = wan_dir / "model"
    make_hub_cache(offline_cache, "tiny/wan-i2v", {name: model / name for name in os.listdir(model)})
    args = _args(wan_dir, tmp_path / "hub.gif", "--seed", "4")
    args[args.index("--model") + 1] = "tiny/wan-i2v"
    assert main(args + ["--cache-dir", str(offline_cache)]) == 0
    assert main(_args(wan_dir, tmp_path / "local.gif", "--seed", "4")) == 0
    assert np.array_equal(captured[0], captured[1])
    assert json.loads((tmp_path / "hub.gif.json").read_text())["settings"]["model"] == "tiny/wan-i2v"


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["video", "--help"])
    assert "instantstyle video --model" in capsys.readouterr().out


def test_stylize_batch_makes_video_rows_and_resumes(wan_dir, tmp_path, capsys):
    manifest = tmp_path / "jobs.jsonl"
    rows = [{"prompt": "a red fox", "style": str(wan_dir / "ref.png"), "name": "fox"},
            {"prompt": "a red fox", "style": str(wan_dir / "ref.png"), "name": "fox-off", "frames": 9, "scale": 0}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    args = ["stylize-batch", str(manifest), "--out", str(out), "--model", str(wan_dir / "model"), "--format", "gif",
            "--frames", "5", "--fps", "10", "--height", "16", "--width", "32", "--steps", "2", "--device", "cpu",
            "--threads", "1"]
    assert main(args) == 0
    for name, frames, scale in (("fox", 5, 1.0), ("fox-off", 9, 0.0)):
        with Image.open(out / f"{name}.gif") as gif:
            assert (gif.n_frames, gif.size) == (frames, (32, 16))
        record = json.loads((out / f"{name}.gif.json").read_text())
        assert record["status"] == "ok" and record["frames"] == frames
        assert set(record["image_scales"].values()) == {scale} and record["target"] == "all"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (2, 0)
    assert main(args) == 0  # a rerun finds both complete
    assert json.loads((out / "summary.json").read_text())["skipped"] == 2
    args[args.index("--frames") + 1] = "9"
    assert main(args) == 0  # --frames changed: only the row without its own frames is redone
    assert [r["status"] for r in json.loads((out / "summary.json").read_text())["results"]] == ["ok", "skipped"]
    with Image.open(out / "fox.gif") as gif:
        assert gif.n_frames == 9


@pytest.mark.parametrize("extra, message", [(["--format", "gif", "--frames", "6"], "--frames: Wan makes 4k+1 frames"),
                                            (["--frames", "5"], "--frames: used only by video rows")])
def test_stylize_batch_video_flags_are_checked_first(tmp_path, capsys, extra, message):
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "x", "style": "a.png"}\n')
    args = ["stylize-batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out"), "--model",
            str(tmp_path / "no-such-model"), "--ip-adapter", str(tmp_path / "ip.bin"), *extra]
    if "gif" in extra:  # a video batch refuses --ip-adapter
        args = args[:-2 - len(extra)] + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_stylize_batch_video_rows_take_per_block_scale_lists(wan_dir, tmp_path, monkeypatch):
    from instantstyle.pipelines import batch_video

    captured = []
    monkeypatch.setattr(batch_video, "save_video", lambda video, path, fps: captured.append(as_uint8_frames(video)))
    ref = _zeroed_reference(wan_dir, seed=6)
    manifest = tmp_path / "jobs.jsonl"
    style = str(wan_dir / "ref.png")
    rows = [{"prompt": "a red fox", "style": style, "name": "off", "scale": [0, 0], "seed": 6},
            {"prompt": "a red fox", "style": style, "name": "targeted", "scale": [0, 0], "target": "blocks.1"},
            {"prompt": "a red fox", "style": style, "name": "three", "scale": [0, 0, 0]}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    args = ["stylize-batch", str(manifest), "--out", str(out), "--model", str(wan_dir / "model"), "--format", "gif",
            "--guidance", "5", *FAST]
    assert main(args) == 1  # two rows fail, each with its reason
    assert np.abs(captured[0] - ref).max() <= 1  # [0, 0] equals diffusers with every add_v_proj zeroed
    record = json.loads((out / "off.gif.json").read_text())  # the sidecar (the video itself was captured)
    assert record["scale"] == [0.0, 0.0] and set(record["image_scales"].values()) == {0.0}
    reasons = {r["name"]: r.get("reason", "") for r in json.loads((out / "summary.json").read_text())["results"]}
    assert "target: a per-block scale list names every block itself" in reasons["targeted"]
    assert "scale: expected 2 numbers (one per block with an image branch), got 3" in reasons["three"]


def test_an_image_row_refuses_a_scale_list(tmp_path):
    from instantstyle.pipelines.manifest import read_manifest

    (tmp_path / "jobs.jsonl").write_text('{"prompt": "x", "style": "a.png", "scale": [1, "a"]}\n'
                                         '{"prompt": "x", "style": "a.png", "scale": []}\n')
    bad, empty = read_manifest(str(tmp_path / "jobs.jsonl"))
    assert "scale[1]: expected a number >= 0" in bad.error and "non-empty list" in empty.error
