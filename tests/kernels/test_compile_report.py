"""Every kernel variant the dispatch can launch builds for sm_80, sm_86, sm_89 and sm_90, compiled
with the launcher's own specialisation, without spills, within the arch's shared memory, on
tensor cores (wgmma on Hopper).  Needs no GPU: triton.compile + cuobjdump."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from instantstyle.kernels.tiles import all_kernel_configs, kernel_config

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
# bf16 builds the same tiles as fp16 (same mma shapes and register use); the CLI covers it
# and test_cli_json_schema compiles it for sm_90.  Kept out here for CI time.
DTYPES = ("float16", "float32")
SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _report(*args):
    """Run the CLI in a fresh process: the tests' interpreter mode can't build cubins."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "instantstyle", "compile-report", *args, "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.stdout, proc.stderr[-3000:]
    return proc.returncode, [SimpleNamespace(**row) for row in json.loads(proc.stdout)], proc.stderr

pytestmark = pytest.mark.slow  # compiles every kernel variant for every arch (about a minute on 2 cores)


@pytest.fixture(scope="module")
def reports():
    args = [a for arch in ARCHS for a in ("--arch", arch)] + [a for d in DTYPES for a in ("--dtype", d)]
    returncode, rows, stderr = _report(*args, "--jobs", str(min(4, os.cpu_count() or 1)))
    assert returncode == 0, stderr[-2000:]  # the CLI itself fails on spills, shared memory or missing tensor cores
    return rows


def test_every_launchable_variant_is_reported_with_both_calls(reports):
    for arch in ARCHS:
        for dtype in DTYPES:
            for features in ("plain", "full"):
                got = {r.variant for r in reports if r.arch == arch and r.dtype == dtype and r.features == features}
                assert got == {f"{SHORT[dtype]}_{c.name}" for c in all_kernel_configs(dtype, arch)}


def test_compiled_with_the_runtime_specialisation(reports):
    """The binder marks 16-divisible sizes/strides and aligned pointers, as a real launch does."""
    assert all(r.specialised_args > 10 for r in reports)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_every_real_shape_maps_to_a_reported_variant(arch, dtype):
    configs = all_kernel_configs(dtype, arch)
    for head_dim in range(8, 257):
        for lt, ip_lens in ((77, (4,)), (77, (16,)), (77, (17,)), (77, (257,)), (512, (4,)), (1, (1,)), (77, (4, 16))):
            assert kernel_config(head_dim, lt, 0, ip_lens, dtype, arch) in configs


def test_no_variant_spills_or_overflows_shared_memory(reports):
    bad = [(r.arch, r.variant, r.features, r.local_bytes, r.spill_instructions, r.shared_bytes) for r in reports
           if r.local_bytes or r.spill_instructions or r.shared_bytes > r.shared_limit]
    assert not bad


def test_hundred_kb_parts_are_checked_against_their_limit(reports):
    assert {r.shared_limit for r in reports if r.arch in ("sm_86", "sm_89")} == {99 * 1024}


def test_every_variant_uses_tensor_cores(reports):
    assert all(r.mma_instructions > 0 for r in reports), [r.variant for r in reports if not r.mma_instructions]


def test_hopper_variants_use_wgmma(reports):
    """wgmma works on 64-row warpgroup tiles: every variant with BLOCK_M >= 64 must use it."""
    hopper = [r for r in reports if r.arch == "sm_90"]
    wide = [r for r in hopper if int(r.variant.split("_m")[1].split("_")[0]) >= 64]
    assert wide and all(r.wgmma_instructions > 0 for r in wide)
    ampere = [r for r in reports if r.arch != "sm_90"]
    assert ampere and all(r.wgmma_instructions == 0 for r in ampere)  # wgmma does not exist before sm_90


def test_cli_json_schema():
    _, rows, _ = _report("--arch", "sm_90", "--dtype", "bfloat16", "--features", "plain")
    assert rows and all(r.arch == "sm_90" and r.dtype == "bfloat16" and r.features == "plain" for r in rows)
    keys = {"kernel", "variant", "arch", "registers", "local_bytes", "shared_bytes", "shared_limit", "mma_instructions"}
    assert all(keys <= set(vars(r)) for r in rows)
