"""The GPU-only branches (graph timing, roofline %, targets, tables), driven on CPU with fake timers.

No GPU is needed and no time is asserted: the fake timers return fixed numbers, so the
test checks the bookkeeping (speedups, bandwidth percentages, target verdicts, tables).
"""
import itertools

import pytest
import torch

from instantstyle.bench import providers as P
from instantstyle.bench import results as R
from instantstyle.bench import suite_kernel, suite_processor, suite_unet
from instantstyle.bench.plot import render_png
from instantstyle.bench.shapes import TARGET_SHAPE_NAME, Shape
from instantstyle.bench.suites import Context
from instantstyle.bench.timing import Timing

TINY_TARGET = Shape(TARGET_SHAPE_NAME, B=2, N=32, H=2, D=16, Lt=7, ip_tokens=(4,))


class FakeGpu(Context):
    """Claims to be a GPU; eager times: 6 ms for the first provider timed, 2 ms after; graphs 3 / 1 ms."""

    def __init__(self, **kw):
        super().__init__(device=torch.device("cpu"), dtypes=[torch.float32], quick=True, copy_gbps=1.0, **kw)
        self._eager = itertools.chain([6.0], itertools.repeat(2.0))
        self._graph = itertools.chain([3.0], itertools.repeat(1.0))
        self.sets = []

    @property
    def is_gpu(self):
        return True

    def time(self, fns, heavy=False):
        self.sets.append(len(fns))
        ms = next(self._eager)
        return Timing(ms, ms * 0.9, ms * 1.1, 10, "cuda-events")

    def time_graph(self, fns):
        ms = next(self._graph)
        return Timing(ms, ms, ms, 10, "cuda-graph")

    def rotation(self, bytes_per_set):
        return 3


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    # the Triton provider would refuse CPU tensors: stand the torch backend in for it
    triton = next(p for p in P.KERNEL_PROVIDERS if p.name == "ours-triton")
    monkeypatch.setattr(triton, "status", lambda device, dtype, shape: None)
    monkeypatch.setattr(triton, "build", P._build_ours("torch"))
    monkeypatch.setattr(suite_kernel, "kernel_shapes", lambda quick, only=(): [TINY_TARGET])
    return FakeGpu(provider_filter=["ours-triton"])


def test_kernel_suite_gpu_bookkeeping(fake_gpu):
    rows = suite_kernel.KernelSuite().run(fake_gpu)
    assert [r["provider"] for r in rows] == ["diffusers", "ours-triton"]
    assert fake_gpu.sets == [3, 3]  # every provider rotated over the input sets
    base, ours = rows
    assert base["ms"] == 6.0 and ours["ms"] == 2.0
    assert ours["speedup"] == pytest.approx(3.0) and ours["speedup_graph"] == pytest.approx(3.0)
    # 1 ms graph time: Q + O bytes / 1 ms against the fake 1 GB/s copy bandwidth
    qo = 2 * (2 * 32 * 2 * 16 * 4)
    assert ours["roofline_graph"]["gbps_qo"] == pytest.approx(qo / 1e-3 / 1e9)
    assert ours["roofline_graph"]["pct_copy_bw_qo"] == pytest.approx(100 * qo / 1e-3 / 1e9)
    target = ours["target"]
    assert target["timer"] == "cuda-graph" and target["speedup"] == pytest.approx(3.0)
    assert target["met"] is False  # 3x passes, the bandwidth (fake tiny shape) misses
    assert "speedup 3.00x" in target["verdict"] and "PASS" in target["verdict"] and "MISS" in target["verdict"]
    assert "target" not in base


def test_gpu_tables_and_plot(fake_gpu, tmp_path):
    rows = [dict(r, device="cuda") for r in suite_kernel.KernelSuite().run(fake_gpu)]
    text = R.render_text(rows, ["a note"])
    assert "CUDA-graph replay" in text and "1.0 ms" not in text  # graph times are shown as "1.00 ms"
    assert "1.00 ms (3.00x)" in text
    md = R.render_markdown(rows, ["a note"], {"device_name": "Fake GPU"}, "x.png")
    assert "| cuda-graph |" in md and "Targets" in md and "a note" in md
    png = render_png(rows, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_processor_suite_gpu_path(fake_gpu, monkeypatch):
    tiny = suite_processor.AttnCase("tiny-attn2", B=2, N=16, channels=64, heads=2, Lt=5, cross_dim=32)
    monkeypatch.setattr(suite_processor, "QUICK_CASES", [tiny])
    rows = suite_processor.ProcessorSuite().run(fake_gpu)
    assert [r["provider"] for r in rows] == ["diffusers", "fused", "no-ip"]
    for r in rows:
        if r["status"] == "ok":
            assert r["ms_graph"] is not None and r["ms_method"] == "cuda-events"
    assert rows[0]["speedup"] == 1.0


@pytest.mark.slow  # whole tiny UNets, every provider
def test_unet_suite_gpu_path(fake_gpu, monkeypatch):
    monkeypatch.setattr(suite_unet, "SDXL_UNET_CONFIG", suite_unet.REDUCED_UNET_CONFIG)
    monkeypatch.setattr(suite_unet, "GPU_LATENT", 8)
    rows = suite_unet.UNetSuite().run(fake_gpu)
    assert rows[0]["case"] == "no-ip" and rows[0]["status"] == "ok"
    assert {r["case"] for r in rows} == {"no-ip", "style", "style+layout", "all-blocks"}
    for r in rows:
        assert not r["status"].startswith("error"), r["status"]
        if r["status"] == "ok" and r["case"] != "no-ip":
            assert r["overhead_pct"] == pytest.approx(-100 * 4 / 6)  # 2 ms vs the 6 ms no-ip step
