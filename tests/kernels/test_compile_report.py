"""Every kernel variant the dispatch can launch builds for sm_80 and sm_90, without
spills, on tensor cores (wgmma on Hopper).  Needs no GPU: triton.compile + cuobjdump."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from instantstyle.kernels.compile_report import DTYPES
from instantstyle.kernels.triton_decoupled import MAX_HEAD_DIM, MIN_HEAD_DIM, all_kernel_configs, kernel_config


def _report(*args):
    """Run the CLI in a fresh process: the tests' interpreter mode can't build cubins."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "instantstyle", "compile-report", *args, "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.stdout, proc.stderr[-3000:]
    return proc.returncode, [SimpleNamespace(**row) for row in json.loads(proc.stdout)]


@pytest.fixture(scope="module")
def reports():
    returncode, rows = _report("--arch", "sm_80", "--arch", "sm_90")
    assert returncode == 0  # the CLI itself fails on spills or missing tensor cores
    return rows


def test_every_launchable_variant_is_reported(reports):
    for arch in ("sm_80", "sm_90"):
        for dtype in DTYPES:
            got = {r.variant for r in reports if r.arch == arch and r.dtype == dtype}
            assert got == {f"{DTYPES[dtype]}_{c.name}" for c in all_kernel_configs(dtype, arch)}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_real_shape_maps_to_a_reported_variant(arch, dtype):
    configs = all_kernel_configs(dtype, arch)
    for head_dim in range(MIN_HEAD_DIM, MAX_HEAD_DIM + 1):
        for ip_tokens in (1, 4, 16, 17, 257, 512):
            assert kernel_config(head_dim, ip_tokens, dtype, arch) in configs


def test_no_variant_spills(reports):
    spilling = [(r.arch, r.variant, r.local_bytes, r.spill_instructions) for r in reports if r.local_bytes or r.spill_instructions]
    assert not spilling


def test_every_variant_uses_tensor_cores(reports):
    assert all(r.mma_instructions > 0 for r in reports), [r.variant for r in reports if not r.mma_instructions]


def test_hopper_variants_use_wgmma(reports):
    """wgmma works on 64-row warpgroup tiles: every variant with BLOCK_M >= 64 must use it."""
    hopper = [r for r in reports if r.arch == "sm_90"]
    wide = [r for r in hopper if int(r.variant.split("_m")[1].split("_")[0]) >= 64]
    assert len(wide) >= len(hopper) - 1  # only fp32 at D=256 needs 16-row tiles
    assert all(r.wgmma_instructions > 0 for r in wide)
    ampere = [r for r in reports if r.arch == "sm_80"]
    assert ampere and all(r.wgmma_instructions == 0 for r in ampere)  # wgmma does not exist before sm_90


def test_cli_json_schema():
    _, rows = _report("--arch", "sm_90", "--dtype", "bfloat16")
    assert rows and all(r.arch == "sm_90" and r.dtype == "bfloat16" for r in rows)
    keys = {"kernel", "variant", "arch", "registers", "local_bytes", "shared_bytes", "mma_instructions"}
    assert all(keys <= set(vars(r)) for r in rows)
