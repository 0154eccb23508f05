"""Ahead-of-time compile every fused-kernel variant for real GPU arches, no GPU needed.

Each variant is compiled EXACTLY as the launcher launches it: the launcher's own
:func:`launch_plan` builds the arguments for a representative call (meta tensors, so no
memory), and Triton's own binder turns them into the signature, the constexprs (ints
equal to 1 included) and the divisibility/alignment ``attrs`` that a runtime launch gets.
For every tile configuration the dispatch can pick (:func:`tiles.all_kernel_configs`)
two calls are compiled:

* ``plain``: an SDXL-like call with no bias, IP mask or joint keys, head dim equal to the
  tile, N a multiple of the query tile (every constexpr flag at its cheap value);
* ``full``: text bias, joint keys with a bias, IP masks, an odd N and a padded head dim
  (40/80/160 as SD1.5) where the bucket allows (the most registers the kernel needs).

The cubin is read with ``cuobjdump``: registers, local memory (spills), shared memory
(checked against the arch's per-block limit) and tensor-core instructions (HMMA =
mma.sync, HGMMA = Hopper wgmma, UTC*MMA = Blackwell tcgen05 on sm_100).

``--backward`` compiles the training kernels instead (:mod:`.triton_decoupled_bwd`):
every launch of a representative backward per head-dim bucket, ``plain`` being a
style-block adapter (dK_ip/dV_ip only) and ``full`` every gradient with long text, joint
keys, biases, masks and a 257-token stream (so the key-tile pass compiles too).

Examples:
  instantstyle compile-report --arch sm_90
  instantstyle compile-report --backward --arch sm_80 --dtype float16
  instantstyle compile-report --arch sm_86 --arch sm_89 --json > report.json
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from .tiles import ARCHS, HEAD_DIM_BUCKETS, SHARED_LIMIT, KernelConfig, all_kernel_configs

#: dtypes the launcher runs (torch names).
DTYPES = ("float16", "bfloat16", "float32")
_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
FEATURES = ("plain", "full")
#: Head dim of the "full" call per bucket: SD1.5's 40/80/160 pad to 64/128/256.
_PADDED_HEAD_DIM = {16: 8, 32: 24, 64: 40, 128: 80, 256: 160}


@dataclass
class VariantReport:
    kernel: str
    variant: str
    arch: str
    dtype: str
    features: str
    registers: int
    local_bytes: int  # local memory per thread: ptxas spills go to the stack frame, counted here
    shared_bytes: int
    shared_limit: int
    mma_instructions: int  # HMMA + HGMMA (+ tcgen05 UTC*MMA on sm_100)
    wgmma_instructions: int  # HGMMA alone (sm_90+)
    spill_instructions: int  # LDL + STL in the SASS
    specialised_args: int  # non-constexpr args the binder marked 16-divisible/aligned
    compile_seconds: float

    @property
    def ok(self) -> bool:
        return not self.local_bytes and not self.spill_instructions and self.mma_instructions > 0 and self.shared_bytes <= self.shared_limit


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} not found at {path}: this triton build ships no NVIDIA binutils")
    return path


def representative_call(cfg: KernelConfig, dtype_name: str, features: str):
    """Meta-device inputs that the launcher maps to ``cfg``'s tiles, and their output buffer."""
    import torch

    from .inputs import normalize_inputs

    dtype = getattr(torch, dtype_name)
    full = features == "full"
    D = _PADDED_HEAD_DIM[cfg.BLOCK_D] if full else cfg.BLOCK_D
    B, N, H = 2, (4099 if full else 4096), 10
    meta = lambda *s: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    if cfg.SINGLE_TILE:
        lj = 8 if full else 0
        lt, ip_lens = min(77, cfg.BLOCK_N - lj - 8), (4, 4) if full else (4,)
    else:
        lj = 40 if full else 0
        lt, ip_lens = 77, ((4, 16) if full else (4,)) if cfg.BLOCK_N_IP <= 16 else ((257, 4) if full else (257,))
    kwargs = dict(q=meta(B, N, H, D), k=meta(B, lt, H, D), v=meta(B, lt, H, D),
                  ip_k=[meta(B, n, H, D) for n in ip_lens], ip_v=[meta(B, n, H, D) for n in ip_lens],
                  ip_scale=[0.5] * len(ip_lens))
    if full:
        kwargs["ip_mask"] = [torch.empty(B, N, device="meta") for _ in ip_lens]
        kwargs["text_bias"] = torch.empty(B, lt, device="meta")
        kwargs.update(joint_k=meta(B, lj, H, D), joint_v=meta(B, lj, H, D), joint_bias=torch.empty(B, lj, device="meta"))
    return normalize_inputs(**kwargs), meta(B, N, H, D)


def _compile_launch(fn, args, kwargs: dict, arch: str):
    """Compile as a runtime launch would: Triton's binder -> triton.compile; (compiled, #attrs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from .triton_decoupled import interpreting

    if interpreting():
        raise RuntimeError("compile-report builds real GPU code: unset TRITON_INTERPRET before importing instantstyle")
    target = GPUTarget("cuda", int(arch[3:]), 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, len(attrs)


def _compile(cfg: KernelConfig, dtype_name: str, arch: str, features: str):
    """The forward kernel for ``cfg``, from the launcher's own launch_plan."""
    from .triton_decoupled import _decoupled_attn_fwd, launch_plan

    inputs, out = representative_call(cfg, dtype_name, features)
    plan = launch_plan(inputs, out, config=cfg)
    return _compile_launch(_decoupled_attn_fwd, plan.args, {**plan.constexprs, **plan.options}, arch)


def _read_cubin(compiled, kernel: str, variant: str, arch: str, dtype_name: str, features: str, n_attrs: int,
                seconds: float) -> VariantReport:
    """Registers, spills, shared memory and tensor-core instructions of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    hgmma = len(re.findall(r"\bHGMMA\.", sass))
    hmma = len(re.findall(r"\bHMMA\.", sass)) + len(re.findall(r"\bUTC\w*MMA\b", sass))  # UTC*MMA: sm_100 tcgen05
    return VariantReport(
        kernel=kernel,
        variant=variant,
        arch=arch,
        dtype=dtype_name,
        features=features,
        registers=int(fields["REG"]),
        local_bytes=int(fields["LOCAL"]) + int(fields["STACK"]),
        shared_bytes=int(compiled.metadata.shared),
        shared_limit=SHARED_LIMIT[arch],
        mma_instructions=hgmma + hmma,
        wgmma_instructions=hgmma,
        spill_instructions=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        specialised_args=n_attrs,
        compile_seconds=round(seconds, 2),
    )


def compile_variant(cfg: KernelConfig, dtype_name: str, arch: str, features: str = "plain") -> VariantReport:
    """Compile one specialisation exactly as the launcher would launch it, and read its cubin."""
    start = time.perf_counter()
    compiled, n_attrs = _compile(cfg, dtype_name, arch, features)
    return _read_cubin(compiled, "_decoupled_attn_fwd", f"{_SHORT[dtype_name]}_{cfg.name}", arch, dtype_name,
                       features, n_attrs, time.perf_counter() - start)


def representative_backward_call(block_d: int, dtype_name: str, features: str):
    """Meta-device ``(inputs, dout, needs)`` of a training call for the backward's tiles.

    ``plain``: a style-block adapter (only dK_ip/dV_ip; SDXL-like sizes, exact head dim);
    ``full``: every gradient, text bias, 200 text keys (two passes), joint keys with a
    bias, masked streams of 4 and 257 tokens (the long one takes the key-tile pass), odd
    N and a padded head dim."""
    import torch

    from .backward import GradNeeds
    from .inputs import normalize_inputs

    dtype = getattr(torch, dtype_name)
    full = features == "full"
    D = _PADDED_HEAD_DIM[block_d] if full else block_d
    B, N, H = 2, (4099 if full else 4096), 10
    lt, lj, ip_lens = (200, 40, (4, 257)) if full else (77, 0, (4,))
    meta = lambda *s: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    kwargs = dict(q=meta(B, N, H, D), k=meta(B, lt, H, D), v=meta(B, lt, H, D),
                  ip_k=[meta(B, n, H, D) for n in ip_lens], ip_v=[meta(B, n, H, D) for n in ip_lens],
                  ip_scale=[0.5] * len(ip_lens))
    if full:
        kwargs["ip_mask"] = [torch.empty(B, N, device="meta") for _ in ip_lens]
        kwargs["text_bias"] = torch.empty(B, lt, device="meta")
        kwargs.update(joint_k=meta(B, lj, H, D), joint_v=meta(B, lj, H, D), joint_bias=torch.empty(B, lj, device="meta"))
        needs = GradNeeds(q=True, kv=True, ip_kv=(True,) * len(ip_lens), ip_scale=True, ip_mask=True, text_bias=True,
                          joint_kv=True, joint_bias=True)
    else:
        needs = GradNeeds(ip_kv=(True,))
    return normalize_inputs(**kwargs), meta(B, N, H, D), needs


def compile_backward_variants(block_d: int, dtype_name: str, arch: str, features: str = "plain", config=None) -> list:
    """Every launch of a representative backward (:func:`representative_backward_call`),
    compiled from the launcher's own :func:`triton_bwd_launch.plan_backward`; one report each.
    ``config`` (a ``BwdConfig``) overrides the tile table, to search it."""
    from .triton_bwd_launch import plan_backward

    inputs, dout, needs = representative_backward_call(block_d, dtype_name, features)
    plan = plan_backward(inputs, dout, needs, arch=arch, config=config)
    reports, seen = [], set()
    for launch in plan.launches:
        key = (launch.kernel, tuple(sorted(launch.constexprs.items())))
        if key in seen:  # e.g. the text and joint key-tile passes of one specialisation
            continue
        seen.add(key)
        start = time.perf_counter()
        compiled, n_attrs = _compile_launch(launch.fn, launch.args, {**launch.constexprs, **launch.options}, arch)
        flavour = ("_ip" if launch.constexprs.get("IS_IP") else "_text") if launch.kernel == "_bwd_key_tiles" else ""
        reports.append(_read_cubin(compiled, launch.kernel + flavour, f"{_SHORT[dtype_name]}_{plan.config.name}", arch,
                                   dtype_name, features, n_attrs, time.perf_counter() - start))
    return reports


def _job(job):
    if job[0] == "backward":
        return compile_backward_variants(*job[1:])
    return [compile_variant(*job)]


def compile_report(archs=("sm_90",), dtypes=DTYPES, features=FEATURES, jobs: int = 1, progress: bool = False,
                   backward: bool = False) -> list:
    """Compile every launchable variant for every arch; one :class:`VariantReport` each.

    ``backward``: the backward's kernels instead, per head-dim bucket (every launch of a
    representative training call, :func:`compile_backward_variants`)."""
    if backward:
        todo = [("backward", bd, dtype, arch, feat) for arch in archs for dtype in dtypes for bd in HEAD_DIM_BUCKETS
                for feat in features]
    else:
        todo = [(cfg, dtype, arch, feat) for arch in archs for dtype in dtypes for cfg in all_kernel_configs(dtype, arch)
                for feat in features]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            return [r for rs in pool.map(_job, todo) for r in rs]
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="compiling", unit="variant", file=sys.stderr)
    return [r for job in todo for r in _job(job)]


def search(candidates, dtype_name: str, arch: str):
    """The first candidate KernelConfig that compiles clean (plain AND full), or None.

    How the spill-free tables in :mod:`.tiles` were found: candidates from large to small.
    """
    for cfg in candidates:
        if all(compile_variant(cfg, dtype_name, arch, feat).ok for feat in FEATURES):
            return cfg
    return None


def add_arguments(parser) -> None:
    parser.add_argument("--arch", action="append", choices=ARCHS, help="target arch (repeatable; default sm_80, sm_86, sm_89, sm_90)")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="only these dtypes (repeatable; default all)")
    parser.add_argument("--features", action="append", choices=FEATURES, help="only these calls (repeatable; default both)")
    parser.add_argument("--backward", action="store_true",
                        help="compile the backward's kernels (training) instead of the forward's")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compiles (default 1)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per variant")


def run(args) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    if args.jobs < 1:
        print(f"--jobs: expected an integer >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    archs = tuple(args.arch or ("sm_80", "sm_86", "sm_89", "sm_90"))
    reports = compile_report(archs, tuple(args.dtype or DTYPES), tuple(args.features or FEATURES), args.jobs, progress=True,
                             backward=getattr(args, "backward", False))
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=1))
    else:
        header = f"{'arch':6} {'kernel':22} {'variant':34} {'call':5} {'regs':>4} {'local':>5} {'smem':>6} {'limit':>6} {'mma':>4} {'wgmma':>5} {'attrs':>5}"
        print(header)
        print("-" * len(header))
        for r in reports:
            print(f"{r.arch:6} {r.kernel:22} {r.variant:34} {r.features:5} {r.registers:4d} {r.local_bytes:5d} {r.shared_bytes:6d} "
                  f"{r.shared_limit:6d} {r.mma_instructions:4d} {r.wgmma_instructions:5d} {r.specialised_args:5d}")
    bad = [f"{r.kernel}:{r.variant}@{r.arch}/{r.features}" for r in reports if not r.ok]
    if bad:
        print(f"spills, shared memory over the limit, or no tensor cores in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
