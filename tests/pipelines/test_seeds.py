"""Issue 16: seeds are integers in [0, 2**64 - 1] for every command, checked before any model loads.

One rule everywhere: a negative seed is refused (``-1`` does not mean "random"), so the seed a
sidecar records always reproduces its image.  2**64 - 1, the largest seed torch's generators
take, works end to end; 2**64 and beyond are one-line errors, not "Overflow when unpacking long
long" after minutes of loading."""
import json

import pytest
import torch

import instantstyle.pipelines.loading as loading
from instantstyle.cli import main
from instantstyle.pipelines.cli_args import SEED_MAX, check_seed, parse_seed
from instantstyle.pipelines.errors import UserError

from helpers.stylize import stylize_args as _args

RANGE = "expected an integer in [0, 18446744073709551615]"


@pytest.mark.parametrize("value, seed", [(0, 0), (7, 7), (2**64 - 1, 2**64 - 1), ("12", 12), (" 12 ", 12),
                                         ("18446744073709551615", 2**64 - 1)])
def test_good_seeds(value, seed):
    assert parse_seed("seed", value) == seed
    torch.Generator(device="cpu").manual_seed(parse_seed("seed", value))  # no overflow at the top of the range


@pytest.mark.parametrize("value, shown", [(-1, "-1 (-1 does not mean random here"), ("-1", "'-1' (-1 does not mean random"),
                                          (2**64, "18446744073709551616"), (2**70, "1180591620717411303424"),
                                          (1.5, "1.5"), (True, "True"), ("1e3", "'1e3'"), ("", "''"), (None, "None"),
                                          ("7_000", "'7_000'"), ([7], "[7]")])
def test_bad_seeds_name_the_argument_the_range_and_the_value(value, shown):
    with pytest.raises(ValueError) as info:
        parse_seed("seed", value)
    assert str(info.value).startswith(f"seed: {RANGE}, got {shown}")
    with pytest.raises(UserError, match=r"^--seed: expected an integer"):
        check_seed("--seed", value)
    assert SEED_MAX == 2**64 - 1


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


@pytest.mark.parametrize("seed", ["-1", str(2**64), str(2**70)])
@pytest.mark.parametrize("command", ["stylize", "stylize-batch"])
def test_cli_refuses_bad_seeds_before_loading(tiny_sdxl, tmp_path, capsys, no_loading, command, seed):
    """`stylize --seed -1` was accepted and 2**70 failed after the models loaded."""
    if command == "stylize":
        args = _args(tiny_sdxl, tmp_path / "x.png")
        args[args.index("--seed") + 1] = seed
    else:
        manifest = tmp_path / "m.jsonl"
        manifest.write_text(json.dumps({"prompt": "p", "style": str(tiny_sdxl / "style.png")}) + "\n")
        args = ["stylize-batch", str(manifest), "--out", str(tmp_path / "out"), "--model", str(tiny_sdxl / "model"),
                "--ip-adapter", str(tiny_sdxl / "ip-adapter.safetensors"), "--seed", seed]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"instantstyle: error: --seed: {RANGE}, got {seed}") and len(err.splitlines()) == 1, err


def test_the_largest_seed_runs_end_to_end(tiny_sdxl, tmp_path):
    out = tmp_path / "top.png"
    args = _args(tiny_sdxl, out, "--threads", "1")
    args[args.index("--steps") + 1] = "1"
    args[args.index("--seed") + 1] = str(2**64 - 1)
    assert main(args) == 0
    assert json.loads((tmp_path / "top.png.json").read_text())["settings"]["seed"] == 2**64 - 1
