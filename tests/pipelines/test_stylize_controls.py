"""`stylize --negative-style` and the control flags (--weight-type, --embeds-scaling,
--composition-weight): one-line errors listing the valid names, wiring into the loader."""
import functools
import inspect
import json

import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

import instantstyle.pipelines.instantstyle as module
from instantstyle.cli import main
from instantstyle.loaders import load_ip_adapter
from instantstyle.pipelines import InstantStyle

from helpers.stylize import pixels, stylize_args as _args


def _weight_types():
    try:
        from instantstyle.processors.targets import weight_types
    except ImportError:
        return None
    return weight_types


NO_NAMES = _weight_types() is None
NO_NAMES_REASON = "instantstyle.processors.targets.weight_types (WEIGHT_TYPES, EMBEDS_SCALING) is missing"
NO_LOADER = "weight_type" not in inspect.signature(load_ip_adapter).parameters
NO_LOADER_REASON = "load_ip_adapter has no weight_type=/embeds_scaling=/composition_weight= yet (processor/loader side)"


def test_negative_style_changes_the_image_and_is_recorded(tiny_sdxl, tmp_path):
    plain, negative = tmp_path / "plain.png", tmp_path / "negative.png"
    assert main(_args(tiny_sdxl, plain)) == 0
    assert main(_args(tiny_sdxl, negative, "--negative-style", str(tiny_sdxl / "style2.png"))) == 0
    assert np.abs(pixels(plain) - pixels(negative)).max() > 2
    record = json.loads((tmp_path / "negative.png.json").read_text())
    assert record["settings"]["negative_style"] == str(tiny_sdxl / "style2.png")


@pytest.mark.parametrize("extra,message", [
    (["--negative-style", "missing.png"], "--negative-style: no such file: missing.png"),
    (["--composition-weight", "inf"], "--composition-weight: expected a finite number, got inf"),
])
def test_bad_negative_style_or_weight_is_one_line(tiny_sdxl, tmp_path, capsys, extra, message):
    assert main(_args(tiny_sdxl, tmp_path / "x.png", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_style_aligned_refuses_the_ip_adapter_controls(tiny_sdxl, tmp_path, capsys):
    args = ["stylize", "--method", "style-aligned", "--model", str(tiny_sdxl / "model"), "--prompt", "a", "--prompt", "b",
            "--composition-weight", "0.5", "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    assert "--composition-weight: not used by --method style-aligned" in capsys.readouterr().err


@pytest.mark.skipif(NO_NAMES, reason=NO_NAMES_REASON)
@pytest.mark.parametrize("flag,tuple_name", [("--weight-type", "WEIGHT_TYPES"), ("--embeds-scaling", "EMBEDS_SCALING")])
def test_unknown_names_are_refused_listing_the_valid_ones(tiny_sdxl, tmp_path, capsys, flag, tuple_name):
    assert main(_args(tiny_sdxl, tmp_path / "x.png", flag, "sideways")) == 2
    err = capsys.readouterr().err.strip()
    valid = getattr(_weight_types(), tuple_name)
    assert len(err.splitlines()) == 1 and f"{flag}: expected one of {', '.join(valid)}, got 'sideways'" in err


@pytest.mark.skipif(NO_NAMES or NO_LOADER, reason=NO_NAMES_REASON if NO_NAMES else NO_LOADER_REASON)
def test_controls_reach_the_loader_and_the_sidecar(tiny_sdxl, tmp_path, monkeypatch):
    seen = []

    @functools.wraps(load_ip_adapter)
    def spy(*args, **kwargs):
        seen.append(kwargs)
        return load_ip_adapter(*args, **kwargs)

    monkeypatch.setattr(module, "load_ip_adapter", spy)
    wt = _weight_types()
    out = tmp_path / "x.png"
    extra = ["--weight-type", wt.WEIGHT_TYPES[-1], "--embeds-scaling", wt.EMBEDS_SCALING[-1], "--composition-weight", "0.5"]
    assert main(_args(tiny_sdxl, out, *extra)) == 0
    assert seen[-1]["weight_type"] == wt.WEIGHT_TYPES[-1] and seen[-1]["embeds_scaling"] == wt.EMBEDS_SCALING[-1]
    assert seen[-1]["composition_weight"] == 0.5
    record = json.loads((tmp_path / "x.png.json").read_text())
    assert record["settings"]["weight_type"] == wt.WEIGHT_TYPES[-1] and record["controls"]["composition_weight"] == 0.5


@pytest.mark.skipif(NO_NAMES or NO_LOADER, reason=NO_NAMES_REASON if NO_NAMES else NO_LOADER_REASON)
def test_configure_controls_all_or_nothing(tiny_sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl / "model")
    style = InstantStyle(pipe, tiny_sdxl / "ip-adapter.safetensors",
                         image_encoder=CLIPVisionModelWithProjection.from_pretrained(tiny_sdxl / "image_encoder"),
                         image_processor=CLIPImageProcessor.from_pretrained(tiny_sdxl / "image_encoder"))
    wt = _weight_types()
    style.configure(weight_type=wt.WEIGHT_TYPES[-1])
    before = (style.target, style.scale, dict(style.controls), style.report,
              {n: type(p) for n, p in pipe.unet.attn_processors.items()})
    with pytest.raises(ValueError):
        style.configure(target="layout", scale=0.3, weight_type="sideways")
    assert before == (style.target, style.scale, dict(style.controls), style.report,
                      {n: type(p) for n, p in pipe.unet.attn_processors.items()})
    style.configure_all(scale=0.3)  # controls left out go back to the loader's defaults
    assert style.controls == {} and style.scale == 0.3
