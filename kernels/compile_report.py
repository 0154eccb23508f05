"""Ahead-of-time compile every fused-kernel variant for a real GPU arch, no GPU needed.

For each specialisation the dispatch can launch (dtype x head-dim bucket x IP key step)
this builds a cubin with ``triton.compile`` for sm_80 (A100) or sm_90 (H100/H200) and
reads it with ``cuobjdump``: registers, local memory (spills), shared memory and the
number of tensor-core instructions (HMMA = mma.sync, HGMMA = Hopper wgmma).

Examples:
  instantstyle compile-report --arch sm_90
  instantstyle compile-report --arch sm_80 --arch sm_90 --json > report.json
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ARCHS = {"sm_80": 80, "sm_90": 90}
#: Triton signature type per torch dtype name used by the dispatch.
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_POINTERS = ("Q", "K", "V", "IPK", "IPV", "O", "JK", "JV")
_FP32_POINTERS = ("TEXT_BIAS", "IP_SCALE", "IP_MASK", "JOINT_BIAS")


@dataclass
class VariantReport:
    kernel: str
    variant: str
    arch: str
    dtype: str
    registers: int
    local_bytes: int  # local memory per thread: ptxas spills go to the stack frame, counted here
    shared_bytes: int
    mma_instructions: int  # HMMA + HGMMA
    wgmma_instructions: int  # HGMMA alone (sm_90)
    spill_instructions: int  # LDL + STL in the SASS
    compile_seconds: float


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} not found at {path}: this triton build ships no NVIDIA binutils")
    return path


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            sig[name] = f"*{dtype}"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name == "IP_OFFSETS":
            sig[name] = "*i32"
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:  # sizes and strides
            sig[name] = "i32"
    return sig


def compile_variant(cfg, dtype_name: str, arch: str) -> VariantReport:
    """Compile one specialisation exactly as the launcher would launch it on a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_decoupled import _decoupled_attn_fwd, interpreting

    if interpreting():
        raise RuntimeError("compile-report builds real GPU code: unset TRITON_INTERPRET before importing instantstyle")
    dtype = DTYPES[dtype_name]
    constexprs = dict(
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_N_IP=cfg.BLOCK_N_IP,
        BLOCK_D=cfg.BLOCK_D,
        DOT_FP32=False,  # the interpreter-only bf16 workaround never reaches a GPU
        INPUT_PRECISION="tf32" if dtype == "fp32" else "ieee",
    )
    start = time.perf_counter()
    src = ASTSource(fn=_decoupled_attn_fwd, signature=_signature(_decoupled_attn_fwd, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", ARCHS[arch], 32), options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    )
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    hgmma = len(re.findall(r"\bHGMMA\.", sass))
    hmma = len(re.findall(r"\bHMMA\.", sass))
    return VariantReport(
        kernel="_decoupled_attn_fwd",
        variant=f"{dtype}_{cfg.name}",
        arch=arch,
        dtype=dtype_name,
        registers=int(fields["REG"]),
        local_bytes=int(fields["LOCAL"]) + int(fields["STACK"]),
        shared_bytes=int(compiled.metadata.shared),
        mma_instructions=hgmma + hmma,
        wgmma_instructions=hgmma,
        spill_instructions=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        compile_seconds=round(seconds, 2),
    )


def compile_report(archs=("sm_90",), dtypes=tuple(DTYPES), progress: bool = False) -> list:
    """Compile every launchable variant for every arch; one :class:`VariantReport` each."""
    from .triton_decoupled import all_kernel_configs

    jobs = [(cfg, dtype, arch) for arch in archs for dtype in dtypes for cfg in all_kernel_configs(dtype, arch)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="compiling", unit="variant", file=sys.stderr)
    return [compile_variant(*job) for job in jobs]


def add_arguments(parser) -> None:
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="target arch (repeatable; default sm_90)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="only these dtypes (repeatable; default all)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per variant")


def run(args) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    reports = compile_report(tuple(args.arch or ["sm_90"]), tuple(args.dtype or DTYPES), progress=True)
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=1))
    else:
        header = f"{'arch':6} {'variant':36} {'regs':>4} {'local':>5} {'smem':>6} {'mma':>4} {'wgmma':>5}"
        print(header)
        print("-" * len(header))
        for r in reports:
            print(f"{r.arch:6} {r.variant:36} {r.registers:4d} {r.local_bytes:5d} {r.shared_bytes:6d} {r.mma_instructions:4d} {r.wgmma_instructions:5d}")
    bad = [r.variant + "@" + r.arch for r in reports if r.local_bytes or not r.mma_instructions]
    if bad:
        print(f"spills or no tensor cores in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
