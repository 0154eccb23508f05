"""The backward's kernels build for a real GPU without one: sm_90 cubins, spill-free, on
tensor cores, within shared memory (the full four-arch table: ``instantstyle
compile-report --backward``).

The compile runs in a subprocess: the test session interprets Triton (conftest sets
TRITON_INTERPRET=1 before import), and compiling needs the real JIT.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a handful of compiles, several seconds each on 2 cores

_SCRIPT = """
import json, sys
from dataclasses import asdict
from instantstyle.kernels.compile_report import compile_backward_variants
reports = []
for block_d, dtype, features in json.loads(sys.argv[1]):
    reports += [asdict(r) for r in compile_backward_variants(block_d, dtype, "sm_90", features)]
print(json.dumps(reports))
"""


def _compile(jobs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(jobs)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_backward_variants_compile_spill_free_for_sm_90():
    # plain: a style-block adapter (preprocess + query tiles); full: every gradient, so the
    # key-tile pass compiles for a text range (with bias) and an IP stream (with masks).
    reports = _compile([[64, "float16", "plain"], [64, "float16", "full"], [128, "bfloat16", "full"]])
    kernels = {(r["kernel"], r["features"]) for r in reports}
    assert {("_bwd_preprocess", "plain"), ("_bwd_query_tiles", "plain"), ("_bwd_query_tiles", "full"),
            ("_bwd_key_tiles_text", "full"), ("_bwd_key_tiles_ip", "full")} <= kernels
    for r in reports:
        where = f"{r['kernel']} {r['variant']} {r['features']}"
        assert r["local_bytes"] == 0 and r["spill_instructions"] == 0, f"{where}: spills ({r['registers']} registers)"
        assert r["mma_instructions"] > 0, f"{where}: no tensor-core instructions"
        assert r["shared_bytes"] <= r["shared_limit"], f"{where}: {r['shared_bytes']} bytes of shared memory"
