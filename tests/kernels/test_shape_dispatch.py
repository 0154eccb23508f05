"""Shape-aware ``auto`` dispatch planned for GPUs that are not present, measured tables, and the
``info`` / ``tune`` commands."""
import json
import os
import subprocess
import sys

import pytest
import torch

from instantstyle.kernels import explain_dispatch
from instantstyle.kernels.dispatch import LONG_KEYS
from instantstyle.kernels.tiles import kernel_config, reload_tuned


def _meta(B, N, H, D, lt, ip_lens, dtype=torch.float16, joint=0):
    t = lambda *s: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    extra = dict(joint_k=t(B, joint, H, D), joint_v=t(B, joint, H, D)) if joint else {}
    return dict(q=t(B, N, H, D), k=t(B, lt, H, D), v=t(B, lt, H, D), ip_k=[t(B, n, H, D) for n in ip_lens],
                ip_v=[t(B, n, H, D) for n in ip_lens], **extra)


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANTSTYLE_TUNED_DIR", str(tmp_path))
    reload_tuned()
    yield tmp_path
    monkeypatch.delenv("INSTANTSTYLE_TUNED_DIR")
    reload_tuned()


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_headline_shape_goes_to_the_kernel_and_plain_attention_to_sdpa(arch, tuned_dir):
    assert explain_dispatch(**_meta(2, 4096, 10, 64, 77, (4,)), device="cuda", arch=arch).backend == "triton"
    plain = explain_dispatch(**_meta(2, 4096, 10, 64, 77, ()), device="cuda", arch=arch)
    assert plain.backend == "torch" and any("plain attention" in why for why in plain.reasons["triton"])


def test_scale_zero_stream_is_plain_attention(tuned_dir):
    d = explain_dispatch(**_meta(2, 1024, 10, 64, 77, (4,)), ip_scale=0, device="cuda", arch="sm_90")
    assert d.backend == "torch"


def test_long_keys_go_to_sdpa_and_joint_keys_alone_are_not_plain(tuned_dir):
    long = explain_dispatch(**_meta(2, 4096, 10, 64, 77, (), joint=4096), device="cuda", arch="sm_90")
    assert long.backend == "torch"
    assert any(f"> {LONG_KEYS}" in why for why in long.reasons["triton"])
    assert not any("plain attention" in why for why in long.reasons["triton"])
    short_joint = explain_dispatch(**_meta(2, 4096, 10, 64, 77, (), joint=64), device="cuda", arch="sm_90")
    assert short_joint.backend == "triton"


def test_every_reason_is_reported_not_only_the_first(tuned_dir):
    kwargs = _meta(1, 64, 2, 264, 4000, (), dtype=torch.float64)
    d = explain_dispatch(**kwargs, device="cuda", arch="sm_80")
    whys = d.reasons["triton"]
    for fragment in ("dtype torch.float64", "head dim 264", "plain attention", "keys >"):
        assert any(fragment in why for why in whys), (fragment, whys)
    with pytest.raises(ValueError, match=r"dtype torch.float64.*; head dim 264"):
        explain_dispatch(**kwargs, device="cuda", arch="sm_80", backend="triton")


def test_explicit_triton_request_still_forces_the_kernel_for_plain_attention(tuned_dir):
    assert explain_dispatch(**_meta(2, 4096, 10, 64, 77, ()), device="cuda", arch="sm_90", backend="triton").backend == "triton"


def test_a_recorded_measurement_flips_the_decision_for_that_arch_only(tuned_dir):
    table = {"dispatch": [{"arch": "sm_90", "dtype": "float16", "case": "plain", "block_d": 64, "keys_bucket": 128,
                           "triton_over_sdpa": 0.8}],
             "tiles": [{"arch": "sm_90", "dtype": "float16", "block_d": 64, "keys_bucket": 128, "kind": "single",
                        "config": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_N_IP": 128, "BLOCK_D": 64, "num_warps": 4,
                                   "num_stages": 2, "SINGLE_TILE": True}}]}
    (tuned_dir / "sm_90.json").write_text(json.dumps(table))
    reload_tuned()
    plain = _meta(2, 4096, 10, 64, 77, ())
    assert explain_dispatch(**plain, device="cuda", arch="sm_90").backend == "triton"
    assert explain_dispatch(**plain, device="cuda", arch="sm_80").backend == "torch"
    assert explain_dispatch(**_meta(2, 4096, 10, 64, 77, (), dtype=torch.bfloat16), device="cuda", arch="sm_90").backend == "torch"
    tuned = kernel_config(64, 77, 0, (4,), "float16", "sm_90")
    assert (tuned.num_warps, tuned.num_stages) == (4, 2)  # the launcher reads the measured tile
    assert kernel_config(64, 77, 0, (4,), "float16", "sm_90", tuned=False).num_warps == 8


def test_a_slower_measurement_is_named_in_the_reason(tuned_dir):
    (tuned_dir / "t.json").write_text(json.dumps({"dispatch": [
        {"arch": "sm_90", "dtype": "float16", "case": "plain", "block_d": 64, "keys_bucket": 128, "triton_over_sdpa": 1.4}]}))
    reload_tuned()
    d = explain_dispatch(**_meta(2, 4096, 10, 64, 77, ()), device="cuda", arch="sm_90")
    assert d.backend == "torch" and any("1.40x SDPA" in why for why in d.reasons["triton"])


def _cli(*args):
    env = dict(os.environ, INSTANTSTYLE_TUNED_DIR="")
    return subprocess.run([sys.executable, "-m", "instantstyle", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # CLI subprocesses
def test_info_plans_for_an_absent_gpu():
    headline = _cli("info", "--shape", "2,4096,10,64,77,4", "--dtype", "float16", "--device", "cuda", "--arch", "sm_90", "--json")
    row = json.loads(headline.stdout)["dispatch"][0]
    assert row["backend"] == "triton" and row["arch"] == "sm_90"
    assert row["triton_config"]["SINGLE_TILE"] and row["macs"]["ratio"] <= 1.6
    assert row["macs"]["useful"] == 2 * 4096 * 10 * 64 * 2 * 81
    plain = json.loads(_cli("info", "--shape", "2,4096,10,64,77,0", "--dtype", "float16", "--device", "cuda",
                            "--arch", "sm_90", "--json").stdout)["dispatch"][0]
    assert plain["backend"] == "torch" and plain["not_chosen"]["triton"]


@pytest.mark.slow  # a CLI subprocess each
@pytest.mark.parametrize("args, message", [
    (("--shape", "2,4096,10,64,77"), "--shape: expected six integers B,N,H,D,Lt,L_ip, got '2,4096,10,64,77'"),
    (("--shape", "2,4096,10,64,0,4"), "--shape: expected B,N,H,D,Lt >= 1 and L_ip >= 0"),
    (("--arch", "sm_75"), "--arch: expected one of sm_80, sm_86, sm_89, sm_90, sm_100, got 'sm_75'"),
    (("--device", "tpu"), "--device: expected one of cpu, cuda, got 'tpu'"),
    (("--dtype", "int8"), "--dtype: expected one of float16, bfloat16, float32, got 'int8'"),
    (("--device", "cpu", "--arch", "sm_90"), "--arch: expected only with --device cuda, got --device cpu"),
])
def test_info_errors_are_one_line_exit_2(args, message):
    proc = _cli("info", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("instantstyle: error: " + message) and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a CLI subprocess
def test_tune_without_cuda_says_so_and_exits_2():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tune would measure")
    proc = _cli("tune")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tune: expected a CUDA GPU to measure on, got none (torch.cuda.is_available() is False)"
