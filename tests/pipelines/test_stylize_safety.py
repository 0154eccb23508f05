"""Issue 12's defects in `instantstyle stylize`: every user mistake is one line, exit 2, found before
any model loads; outputs never lose or overwrite another run's data; settings travel with the image."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import instantstyle.pipelines.loading as loading
from instantstyle.cli import main

from helpers.stylize import stylize_args as _args


def _set(args, flag, value):
    args = list(args)
    if flag in args:
        i = args.index(flag)
        if value is None:
            del args[i:i + 2]
        else:
            args[i + 1] = value
    elif value is not None:
        args += [flag, value]
    return args


@pytest.fixture
def no_loading(monkeypatch):
    """Mistakes must surface before minutes of model loading."""
    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


BAD = [
    ({"--out": "{tmp}"}, r"--out: .* is a folder"),
    ({"--out": "{tmp}/noext"}, r"--out: .* needs an image extension"),
    ({"--out": "{tmp}/x.json"}, r"--out: .* is a \.json name"),
    ({"--out": "/proc/no/such/x.png"}, r"--out: can't create folder"),
    ({"--height": "60"}, r"--height: expected a positive multiple of 8.*got 60"),
    ({"--steps": "0"}, r"--steps: expected >= 1, got 0"),
    ({"--scale": "-1"}, r"--scale: expected >= 0, got -1"),
    ({"--scale": "nan"}, r"--scale: expected a finite number, got nan"),
    ({"--device": "cuda"}, r"--device cuda: this torch build sees no CUDA GPU"),
    ({"--device": "banana"}, r"--device: not a device name"),
    ({"--preset": "layout", "--target": "up_blocks.0"}, r"--target and --preset: give one"),
    ({"--start-at": "0.8", "--end-at": "0.2"}, r"--start-at/--end-at: expected start < end"),
    ({"--threads": "0"}, r"--threads: expected a positive integer"),
    ({"--ip-adapter": "{root}"}, r"--ip-adapter: .* is a folder: name the checkpoint file.*ip-adapter\.bin"),
    ({"--ip-adapter": "{tmp}/nope", "--weight-name": "a.bin"}, r"--ip-adapter: no such file or folder: '.*nope'$"),
    ({"--ip-adapter": "./missing/ip.safetensors"}, r"--ip-adapter: no such file or folder"),
    ({"--style": "{truncated}"}, r"--style: can't read .*truncated"),
    ({"--style": "{root}"}, r"--style: .* is a folder"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-build case")
@pytest.mark.parametrize("changes, message", BAD, ids=[m[:40] for _, m in BAD])
def test_user_mistakes_are_one_line_before_loading(tiny_sdxl, tmp_path, capsys, no_loading, changes, message):
    data = (tiny_sdxl / "style.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    args = _args(tiny_sdxl, tmp_path / "x.png")
    for flag, value in changes.items():
        args = _set(args, flag, value.format(tmp=tmp_path, root=tiny_sdxl, truncated=tmp_path / "truncated.png"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("instantstyle: error: "), err
    assert re.search(message, err.splitlines()[0]), err


def test_decompression_bomb_is_refused(tiny_sdxl, tmp_path, capsys, no_loading, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 40x40 style image is > 2x this
    assert main(_args(tiny_sdxl, tmp_path / "x.png")) == 2
    assert "decompression bomb" in capsys.readouterr().err


def test_single_prompt_style_aligned_is_refused(tiny_sdxl, tmp_path, capsys, no_loading):
    args = ["stylize", "--method", "style-aligned", "--model", str(tiny_sdxl / "model"), "--prompt", "a",
            "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    assert "needs two or more prompts" in capsys.readouterr().err


@pytest.mark.parametrize("content, kind", [(b"", "empty"), (b"\x80\x02garbage", "pickle"), (b"\x00" * 16, "safetensors")])
def test_unreadable_checkpoints_are_one_line_errors(tiny_sdxl, tmp_path, capsys, content, kind):
    bad = tmp_path / ("bad.safetensors" if kind == "safetensors" else "bad.bin")
    bad.write_bytes(content)
    assert main(_set(_args(tiny_sdxl, tmp_path / "x.png"), "--ip-adapter", str(bad))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not a readable IP-Adapter checkpoint" in err, err


def test_debug_shows_the_traceback(tiny_sdxl, tmp_path):
    with pytest.raises(Exception, match="--steps"):
        main(_set(_args(tiny_sdxl, tmp_path / "x.png"), "--steps", "0") + ["--debug"])


def test_sidecars_never_collide_and_carry_backend_scheduler_and_png_text(tiny_sdxl, tmp_path):
    png, jpg = tmp_path / "a.png", tmp_path / "a.jpg"
    assert main(_args(tiny_sdxl, png, "--backend", "torch", "--threads", "1", "--start-at", "0.0", "--end-at", "0.5")) == 0
    assert main(_set(_args(tiny_sdxl, jpg), "--seed", "8")) == 0
    a, b = (json.loads((tmp_path / f"a.{e}.json").read_text()) for e in ("png", "jpg"))
    assert a["image"] == str(png) and b["image"] == str(jpg)  # neither overwrote the other's record
    assert a["settings"]["seed"] == 7 and b["settings"]["seed"] == 8
    assert a["backend"] == "torch" and a["threads"] == 1 and a["scheduler"]["class"] == "EulerDiscreteScheduler"
    assert a["settings"]["end_at"] == 0.5 and "keys_scale" not in a["settings"]
    text = Image.open(png).text
    assert json.loads(text["instantstyle"])["prompt"] == "a dog on a bench" and "EulerDiscreteScheduler" in text["parameters"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".instantstyle-tmp-")]  # no temporary leftovers


def test_style_aligned_sidecar_has_no_instantstyle_defaults(tiny_sdxl, tmp_path):
    out = tmp_path / "t.png"
    args = ["stylize", "--method", "style-aligned", "--model", str(tiny_sdxl / "model"), "--prompt", "a", "--prompt", "b",
            "--steps", "1", "--height", "32", "--width", "32", "--out", str(out)]
    assert main(args) == 0
    settings = json.loads((tmp_path / "t.png.json").read_text())["settings"]
    assert not {"scale", "content_scale", "preset", "target", "ip_adapter", "style"} & set(settings)
    assert settings["keys_scale"] == 1.0


@pytest.mark.slow
def test_stylize_from_a_hub_id_offline(tiny_sdxl, tmp_path):
    """`--ip-adapter h94/IP-Adapter --subfolder sdxl_models --weight-name ...` from a local hub cache
    (HF_HUB_CACHE + HF_HUB_OFFLINE=1), the image encoder found in the repo as diffusers does."""
    from helpers.hub_cache import make_hub_cache

    cache = tmp_path / "hub"
    make_hub_cache(cache, "h94/IP-Adapter", {"sdxl_models/ip-adapter_sdxl.safetensors": tiny_sdxl / "ip-adapter.safetensors",
                                             "sdxl_models/image_encoder": tiny_sdxl / "image_encoder"})
    args = _set(_set(_args(tiny_sdxl, tmp_path / "hub.png"), "--ip-adapter", "h94/IP-Adapter"), "--image-encoder", None)
    args += ["--subfolder", "sdxl_models", "--weight-name", "ip-adapter_sdxl.safetensors", "--steps", "1"]
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "instantstyle", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "hub.png.json").read_text())
    assert record["ip_adapter_file"].startswith(str(cache)) and record["targets"]


# ---- issue 16 ----

@pytest.mark.skipif(not os.path.isdir("/sys") or os.path.exists("/sys/x.png"), reason="needs Linux's /sys")
def test_out_in_a_folder_that_refuses_files_fails_before_loading(tiny_sdxl, tmp_path, capsys, no_loading):
    """`os.access` says /sys is writable for root; generation ran, then the image was lost to a
    PermissionError.  The check now creates (and removes) a real file in the folder."""
    assert main(_set(_args(tiny_sdxl, tmp_path / "x.png"), "--out", "/sys/x.png")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.match(r"instantstyle: error: --out: expected a folder that takes new files, got '/sys': can't create", err), err
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".instantstyle-tmp-")]


def test_the_out_check_leaves_no_file_behind(tiny_sdxl, tmp_path, no_loading):
    from instantstyle.pipelines.outputs import writable_folder

    assert writable_folder(str(tmp_path / "new"), "--out") == str(tmp_path / "new")
    assert os.listdir(tmp_path / "new") == []


def test_info_errors_have_the_prefix_every_command_uses(capsys):
    """`instantstyle info` printed its one-line errors without `instantstyle: error:`."""
    assert main(["info", "--shape", "1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "instantstyle: error: --shape: expected six integers B,N,H,D,Lt,L_ip, got '1,2'"
    assert main(["info", "--device", "tpu"]) == 2
    assert capsys.readouterr().err.startswith("instantstyle: error: --device: expected one of cpu, cuda, got 'tpu'")
