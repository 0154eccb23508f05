"""Fast unit tests of the benchmark's pieces: formulas, timers' statistics, files, CLI errors."""
import json

import pytest
import torch

from instantstyle.bench import providers as P
from instantstyle.bench import results as R
from instantstyle.bench import roofline, timing
from instantstyle.bench.shapes import FULL_SHAPES, QUICK_SHAPES, TARGET_SHAPE_NAME, Shape, kernel_shapes
from instantstyle.cli import main
from instantstyle.kernels import normalize_inputs, reference_decoupled_attention

# ---------------------------------------------------------------- roofline


def test_bytes_and_flops_hand_computed():
    # B=1, N=2, H=1, D=4: Q and O are 8 elements each; K/V: 2 * 4 * (3 text + 1 IP) = 32 elements.
    s = Shape("tiny", B=1, N=2, H=1, D=4, Lt=3, ip_tokens=(1,))
    b = roofline.bytes_moved(s, elem_size=2)
    assert b == {"q": 16, "kv": 64, "o": 16, "qo": 32, "total": 96}
    # 4 * B*H*N*D*(Lt + L_ip) = 4 * 1*1*2*4*4
    assert roofline.flops(s) == 128


def test_bytes_and_flops_sdxl_target_fp16():
    s = next(x for x in FULL_SHAPES if x.name == TARGET_SHAPE_NAME)
    assert (s.B, s.N, s.H, s.D, s.Lt, s.ip_tokens) == (2, 4096, 10, 64, 77, (4,))
    b = roofline.bytes_moved(s, 2)
    assert b["q"] == b["o"] == 2 * 4096 * 10 * 64 * 2 == 10_485_760
    assert b["kv"] == 2 * 2 * 10 * 64 * 81 * 2 == 414_720
    assert roofline.flops(s) == 1_698_693_120


def test_two_streams_count_all_ip_tokens():
    s = Shape("two", B=2, N=8, H=2, D=16, Lt=5, ip_tokens=(4, 16))
    assert roofline.bytes_moved(s, 4)["kv"] == 2 * 2 * 2 * 16 * (5 + 20) * 4
    assert roofline.flops(s) == 4 * 2 * 2 * 8 * 16 * 25


def test_roofline_fields_bandwidth():
    s = Shape("tiny", B=1, N=2, H=1, D=4, Lt=3, ip_tokens=(1,))
    f = roofline.roofline_fields(s, 2, ms=1e-3, copy_gbps=0.192)  # 96 B in 1 us = 0.096 GB/s
    assert f["gbps"] == pytest.approx(0.096)
    assert f["gbps_qo"] == pytest.approx(0.032)
    assert f["pct_copy_bw"] == pytest.approx(50.0)
    assert f["pct_copy_bw_qo"] == pytest.approx(100 * 0.032 / 0.192)
    untimed = roofline.roofline_fields(s, 2, ms=None, copy_gbps=0.192)
    assert untimed["bytes"] == 96 and untimed["gbps"] is None and untimed["pct_copy_bw"] is None


# ---------------------------------------------------------------- timing helpers


def test_summarize_quantiles():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0], "x")
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.runs) == (3.0, pytest.approx(1.8), pytest.approx(4.2), 5)


def test_rotation_sets_exceed_l2():
    assert timing.rotation_sets(10 * 2**20, 50 * 2**20) == 10
    assert timing.rotation_sets(500 * 2**20, 50 * 2**20) == 2  # always at least two
    assert timing.rotation_sets(1, 50 * 2**20, max_sets=32) == 32


def test_cpu_timers_count_runs():
    calls = []
    t = timing.cpu_time(lambda: calls.append(1), warmup=2, min_runs=4, max_runs=4, budget_s=0)
    assert t.runs == 4 and len(calls) == 6 and t.p20_ms <= t.median_ms <= t.p80_ms
    seen = []
    res = timing.cpu_time_interleaved({"a": lambda: seen.append("a"), "b": lambda: seen.append("b")},
                                      warmup=0, min_runs=3, max_runs=3, budget_s=0)
    assert seen == ["a", "b"] * 3 and res["a"].runs == res["b"].runs == 3


# ---------------------------------------------------------------- shapes and providers


def test_catalogue_covers_the_issue():
    names = {s.name for s in FULL_SHAPES}
    assert TARGET_SHAPE_NAME in {s.name for s in QUICK_SHAPES}
    assert {s.D for s in FULL_SHAPES} >= {40, 64, 80, 160}
    assert {s.B for s in FULL_SHAPES} >= {1, 2, 8}
    assert any(s.Lt == 231 for s in FULL_SHAPES)
    assert {t for s in FULL_SHAPES for t in s.ip_tokens} >= {4, 16, 257}
    assert any(len(s.ip_tokens) == 2 for s in FULL_SHAPES)
    assert len(names) == len(FULL_SHAPES)
    assert [s.name for s in kernel_shapes(False, ["face257"])] == ["sdxl-4096x10-face257"]


def test_baseline_math_matches_reference():
    torch.manual_seed(0)
    s = Shape("t", B=2, N=7, H=3, D=8, Lt=5, ip_tokens=(4, 3))
    case = P.make_case(s, torch.float64, torch.device("cpu"))
    assert case.scales == [1.0, 0.5]
    ref = reference_decoupled_attention(normalize_inputs(case.q, case.k, case.v, case.ip_k, case.ip_v, case.scales))
    out = P.diffusers_math(case.q, case.k, case.v, case.ip_k, case.ip_v, case.scales)
    assert out.shape == (2, 7, 3, 8)
    assert P.relative_error(out, ref) < 1e-12
    # and it is not trivially equal to the text-only attention
    text_only = P.diffusers_math(case.q, case.k, case.v, [], [], [])
    assert P.relative_error(text_only, ref) > 1e-3


def test_triton_provider_on_cpu_is_not_timed():
    triton = next(p for p in P.KERNEL_PROVIDERS if p.name == "ours-triton")
    assert triton.status(torch.device("cpu"), torch.float32, QUICK_SHAPES[0]) == P.NOT_TIMED_NO_GPU


# ---------------------------------------------------------------- results files


def test_jsonl_appends_and_reads_back(tmp_path):
    path = tmp_path / "d.jsonl"
    R.append_jsonl(path, [{"run_id": "a", "x": 1}])
    R.append_jsonl(path, [{"run_id": "b", "x": 2}, {"run_id": "b", "x": 3}])
    assert [r["x"] for r in R.read_jsonl(path)] == [1, 2, 3]
    assert [r["x"] for r in R.read_jsonl(path, run_id="b")] == [2, 3]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_device_slug():
    assert R.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert R.device_slug("CPU Intel(R) Xeon(R) Processor (2 threads)") == "cpu-intel-xeon-processor"


def test_metadata_fields():
    meta = R.run_metadata(torch.device("cpu"), quick=True)
    for key in ("run_id", "time_utc", "device_name", "torch", "triton", "diffusers", "xformers", "git_commit"):
        assert meta[key], key
    assert meta["time_utc"].endswith("Z")


# ---------------------------------------------------------------- CLI errors


@pytest.mark.parametrize("argv, message", [
    (["--suite", "nope"], "invalid choice"),
    (["--dtype", "float8"], "invalid choice"),
    (["--shape", "no-such-shape"], "matches no case"),
    (["--provider", "cudnn"], "invalid choice"),
    (["--threads", "0"], "positive integer"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


@pytest.mark.parametrize("name", ["pack-2", "ip-layer", "style"])
def test_every_suites_case_names_are_known_to_shape(name):
    from instantstyle.bench.cli import _shape_filter

    assert _shape_filter(name) == name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cuda"])
    assert exc.value.code == 2 and "cuda" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "instantstyle bench --quick" in out and "--results-dir" in out


def test_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert TARGET_SHAPE_NAME in out and "ours-triton" in out and "unet" in out
