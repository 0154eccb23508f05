"""End to end: ``instantstyle bench --quick --json`` as CI runs it, in a subprocess.

One run (module fixture) is checked from every side: the JSON on stdout, the JSON-lines
file, the markdown and the PNG.  Nothing here asserts a time or a speedup.
"""
import datetime as dt
import json
import os
import subprocess
import sys

import pytest
import torch

from instantstyle.bench import roofline
from instantstyle.bench.providers import NOT_TIMED_NO_GPU
from instantstyle.bench.shapes import QUICK_SHAPES, TARGET_SHAPE_NAME

GPU = torch.cuda.is_available()
pytestmark = pytest.mark.slow  # a whole `bench --quick` run in a subprocess

META_KEYS = ("run_id", "time_utc", "device_name", "torch", "triton", "diffusers", "xformers", "git_commit")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    results = tmp_path_factory.mktemp("bench-results")
    proc = subprocess.run(
        [sys.executable, "-m", "instantstyle", "bench", "--quick", "--json", "--results-dir", str(results)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    return proc, results


@pytest.fixture(scope="module")
def rows(quick):
    proc, _ = quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # stdout holds the JSON and nothing else


def _row(rows, suite, case, provider):
    found = [r for r in rows if (r["suite"], r["case"], r["provider"]) == (suite, case, provider)]
    assert len(found) == 1, (suite, case, provider, len(found))
    return found[0]


def test_rows_carry_metadata(rows):
    assert rows and isinstance(rows, list)
    assert len({r["run_id"] for r in rows}) == 1
    for r in rows:
        for key in META_KEYS:
            assert r.get(key), key
        assert r["quick"] is True
        dt.datetime.fromisoformat(r["time_utc"].replace("Z", "+00:00"))
        assert not str(r["status"]).startswith("error"), r["status"]


def test_every_suite_ran(rows):
    assert {r["suite"] for r in rows} == {"kernel", "processor", "unet", "host", "train", "pack"}


def test_pack_rows(rows):
    for case in ("pack-2", "pack-4"):
        base, packed = _row(rows, "pack", case, "one-by-one"), _row(rows, "pack", case, "packed")
        assert base["baseline"] and base["status"] == packed["status"] == "ok"
        assert packed["speedup"] == pytest.approx(base["ms"] / packed["ms"])


def test_host_rows(rows):
    for case in ("ip-layer", "plain-layer"):
        base, fused = _row(rows, "host", case, "diffusers"), _row(rows, "host", case, "fused")
        assert base["baseline"] and base["status"] == fused["status"] == "ok"
        assert 0 < fused["ms_p20"] <= fused["ms"] <= fused["ms_p80"] < 10  # per call: microseconds, not a batch
        assert fused["speedup"] == pytest.approx(base["ms"] / fused["ms"])


def test_kernel_rows(rows):
    for shape in QUICK_SHAPES:
        base = _row(rows, "kernel", shape.name, "diffusers")
        assert base["baseline"] and base["status"] == "ok"
        for name in ("diffusers", "ours-torch", "eager"):
            r = _row(rows, "kernel", shape.name, name)
            assert r["status"] == "ok"
            assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"]
            assert r["ms_runs"] >= 3
            assert r["rel_err"] < (1e-4 if r["dtype"] == "float32" else 2e-2)
            assert r["speedup"] == pytest.approx(base["ms"] / r["ms"])
            elem = torch.empty(0, dtype=getattr(torch, r["dtype"])).element_size()
            assert r["bytes"] == roofline.bytes_moved(shape, elem)["total"]
            assert r["flops"] == roofline.flops(shape)
            assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert _row(rows, "kernel", shape.name, "xformers")["status"] == "ok" or \
            _row(rows, "kernel", shape.name, "xformers")["status"].startswith("absent")


@pytest.mark.skipif(GPU, reason="CPU behaviour")
def test_triton_rows_say_not_timed_on_cpu(rows):
    triton = [r for r in rows if r["provider"] == "ours-triton" and r["suite"] == "kernel"]
    assert len(triton) == len(QUICK_SHAPES)
    assert all(r["status"] == NOT_TIMED_NO_GPU for r in rows if r["provider"] == "ours-triton")  # train rows too
    for r in triton:
        assert r["status"] == NOT_TIMED_NO_GPU
        assert r["ms"] is None and r["speedup"] is None and r["gbps"] is None
    target = _row(rows, "kernel", TARGET_SHAPE_NAME, "ours-triton")["target"]
    assert target["met"] is None and "not measured" in target["verdict"]


def test_processor_and_unet_rows(rows):
    proc = [r for r in rows if r["suite"] == "processor"]
    assert {r["provider"] for r in proc} == {"diffusers", "fused", "no-ip"}
    for r in proc:
        assert r["status"] == "ok" or r["status"].startswith("not available yet")
        if r["provider"] == "fused" and r["status"] == "ok":
            assert r["rel_diff_vs_baseline"] < 1e-3
    unet = [r for r in rows if r["suite"] == "unet"]
    assert {r["case"] for r in unet} == {"no-ip", "style", "style+layout", "all-blocks"}
    noip = _row(rows, "unet", "no-ip", "diffusers")
    assert noip["status"] == "ok" and noip["ms"] > 0
    for r in unet:
        if r["status"] == "ok" and r["case"] != "no-ip":
            assert r["overhead_pct"] == pytest.approx(100 * (r["ms"] - noip["ms"]) / noip["ms"])


def test_files(quick, rows):
    _, results = quick
    jsonl = list(results.glob("*.jsonl"))
    assert len(jsonl) == 1
    lines = [json.loads(line) for line in jsonl[0].read_text().splitlines() if line.strip()]
    assert lines == rows
    md = jsonl[0].with_suffix(".md").read_text()
    for text in ("kernel suite", "processor suite", "unet suite", TARGET_SHAPE_NAME, rows[0]["git_commit"],
                 "Roofline", "| diffusers |"):
        assert text in md, text
    if not GPU:
        assert NOT_TIMED_NO_GPU in md
    png = jsonl[0].with_suffix(".png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    h, w = matplotlib.image.imread(str(png)).shape[:2]
    assert h > 300 and w > 300


def test_human_output_went_to_stderr(quick):
    proc, _ = quick
    assert "kernel suite" in proc.stderr and "rows appended to" in proc.stderr
