"""Measure tile configurations on the GPU present and write the table the launcher reads.

For each (dtype, head-dim bucket, key-length bucket) of a small grid of SDXL/SD1.5
shapes this times a handful of candidate tiles around the spill-free table's entry (the
entry itself always included) with CUDA events (``triton.testing.do_bench``, median)
and keeps the fastest.  It also times the kernel against SDPA (the torch backend) for
the two classes of call the dispatch sends to SDPA by default (plain attention and long
keys), so ``auto`` picks the kernel there only where it measured faster.

The JSON goes to ``--out`` (default ``$INSTANTSTYLE_TUNED_DIR/<arch>.json``, else
``~/.cache/instantstyle/tuned/<arch>.json``); the launcher reads every ``*.json`` in the
package's ``src/instantstyle/kernels/tuned/`` and in ``$INSTANTSTYLE_TUNED_DIR``.  To ship a measured table,
``--out src/instantstyle/kernels/tuned/<arch>.json`` and commit it with the device name it records.

Examples:
  instantstyle tune                      # about 1-3 minutes on an H100
  instantstyle tune --dtype float16 --out src/instantstyle/kernels/tuned/sm_90.json
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace

#: (B, N, H, D, Lt, Lj, ip_lens): cross-attention at SDXL 1024^2 / SD1.5 512^2 sizes.
SHAPES = [
    (2, 4096, 10, 64, 77, 0, (4,)),  # SDXL base adapter: single tile
    (2, 1024, 20, 64, 77, 0, (16,)),  # SDXL Plus adapter
    (2, 4096, 10, 64, 77, 0, (257,)),  # full-face: long IP stream
    (2, 4096, 8, 40, 77, 0, (4,)),  # SD1.5, padded head dim
    (2, 1024, 8, 80, 77, 0, (4,)),
    (2, 256, 8, 160, 77, 0, (4,)),
]
#: Calls the dispatch sends to SDPA unless measured: (case, B, N, H, D, Lt, Lj).
DISPATCH_SHAPES = [("plain", 2, 4096, 10, 64, 77, 0), ("plain", 2, 1024, 20, 64, 77, 0), ("long", 2, 4096, 10, 64, 4096, 0),
                   ("long", 2, 1024, 20, 64, 1024, 0)]
DTYPES = ("float16", "bfloat16")


def default_out(arch: str) -> str:
    folder = os.environ.get("INSTANTSTYLE_TUNED_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "instantstyle", "tuned")
    return os.path.join(folder, f"{arch}.json")


def candidates(base):
    """The spill-free entry first, then neighbours: query tile, warps, stages."""
    out = [base]
    for bm in (64, 128):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                c = replace(base, BLOCK_M=bm, num_warps=warps, num_stages=stages)
                if c not in out:
                    out.append(c)
    return out


def _inputs(B, N, H, D, lt, lj, ip_lens, dtype):
    import torch

    from .inputs import normalize_inputs

    r = lambda L: torch.randn(B, L, H, D, device="cuda", dtype=dtype)  # noqa: E731
    joint = dict(joint_k=r(lj), joint_v=r(lj)) if lj else {}
    return normalize_inputs(r(N), r(lt), r(lt), [r(n) for n in ip_lens], [r(n) for n in ip_lens], [0.7] * len(ip_lens), **joint)


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def tune(arch: str, dtypes=DTYPES, budget_s: float = 300.0, log=print) -> dict:
    import torch

    from .tiles import (
        _SPILL_FREE,
        dtype_class,
        head_dim_bucket,
        kernel_config,
        key_length_bucket,
        launch_kind,
    )
    from .torch_backend import torch_decoupled_attention
    from .triton_decoupled import triton_decoupled_attention

    start = time.perf_counter()
    tiles, dispatch = [], []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for B, N, H, D, lt, lj, ip_lens in SHAPES:
            if time.perf_counter() - start > budget_s:
                log(f"tune: time budget of {budget_s:.0f} s spent; the rest keeps the spill-free tiles")
                break
            inputs = _inputs(B, N, H, D, lt, lj, ip_lens, dtype)
            out = torch.empty_like(inputs.q)
            base = kernel_config(D, lt, lj, ip_lens, dtype_name, arch, tuned=False)
            timed = []
            for cfg in candidates(base):
                try:
                    timed.append((_time_ms(lambda: triton_decoupled_attention(inputs, out, config=cfg)), cfg))
                except Exception as exc:  # out of shared memory / registers on this part: not a candidate
                    log(f"  skip {cfg.name}: {type(exc).__name__}")
            ms, best = min(timed, key=lambda t: t[0])
            kind = launch_kind(_SPILL_FREE[(arch, dtype_class(dtype_name))][head_dim_bucket(D)], lt, lj, ip_lens)
            tiles.append({"arch": arch, "dtype": dtype_name, "block_d": head_dim_bucket(D), "kind": kind,
                          "keys_bucket": key_length_bucket(lt + lj + sum(ip_lens)), "config": asdict(best),
                          "ms": round(ms, 5), "spill_free_ms": round(timed[0][0], 5), "shape": [B, N, H, D, lt, lj, list(ip_lens)]})
            log(f"{dtype_name} {(B, N, H, D, lt, ip_lens)}: {best.name} {ms:.4f} ms (spill-free table {timed[0][0]:.4f} ms)")
        for case, B, N, H, D, lt, lj in DISPATCH_SHAPES:
            inputs = _inputs(B, N, H, D, lt, lj, (), dtype)
            t_triton = _time_ms(lambda: triton_decoupled_attention(inputs))
            t_sdpa = _time_ms(lambda: torch_decoupled_attention(inputs))
            dispatch.append({"arch": arch, "dtype": dtype_name, "case": case, "block_d": head_dim_bucket(D),
                             "keys_bucket": key_length_bucket(lt + lj), "triton_over_sdpa": round(t_triton / t_sdpa, 3),
                             "triton_ms": round(t_triton, 5), "sdpa_ms": round(t_sdpa, 5), "shape": [B, N, H, D, lt, lj]})
            log(f"{dtype_name} {case} {(B, N, H, D, lt)}: kernel {t_triton:.4f} ms, SDPA {t_sdpa:.4f} ms")
    return {"device": torch.cuda.get_device_name(), "arch": arch, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"), "tiles": tiles, "dispatch": dispatch}


def add_arguments(parser) -> None:
    parser.add_argument("--dtype", action="append", help="dtypes to tune (repeatable; float16, bfloat16; default both)")
    parser.add_argument("--out", help="JSON path (default $INSTANTSTYLE_TUNED_DIR/<arch>.json or ~/.cache/instantstyle/tuned/<arch>.json)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop tuning new shapes after this many seconds (default 300)")


def run(args) -> int:
    import torch

    for name in args.dtype or ():
        if name not in DTYPES:
            print(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}", file=sys.stderr)
            return 2
    if args.budget_s <= 0:
        print(f"--budget-s: expected a number of seconds > 0, got {args.budget_s}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("tune: expected a CUDA GPU to measure on, got none (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from .tiles import arch_for_capability, reload_tuned
    from .triton_decoupled import interpreting

    if interpreting():
        print("tune: expected compiled kernels, got TRITON_INTERPRET=1 (unset it)", file=sys.stderr)
        return 2
    arch = arch_for_capability(*torch.cuda.get_device_capability())
    table = tune(arch, tuple(args.dtype or DTYPES), args.budget_s, log=lambda m: print(m, file=sys.stderr))
    path = args.out or default_out(arch)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)  # atomic: a launcher never reads half a table
    reload_tuned()
    print(path)
    return 0
