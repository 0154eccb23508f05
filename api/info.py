"""Report versions, devices, optional extras, and which attention backend would run.

For a given shape (default: an SDXL 1024x1024 cross-attention layer, B=2 CFG batch,
4096 queries, 10 heads of 64, 77 text tokens, one 4-token IP stream) it says which
backend ``decoupled_attention`` would choose on each device and dtype, and why every
other backend was not chosen.

Examples:
  instantstyle info
  instantstyle info --shape 2,1024,20,64,77,16 --dtype bfloat16 --json
"""
from __future__ import annotations

import importlib
import json
import os
import platform

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_SHAPE = "2,4096,10,64,77,4"


def package_versions() -> dict:
    """Installed versions of what instantstyle uses; optional extras say 'absent'."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "triton", "diffusers", "transformers", "safetensors", "numpy", "xformers"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as exc:  # ImportError, or a broken build (xformers vs a mismatched torch)
            versions[name] = "absent" if isinstance(exc, ImportError) else f"broken ({type(exc).__name__})"
    return versions


def devices() -> list:
    found = [{"device": "cpu", "name": platform.processor() or platform.machine()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            found.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i), "capability": f"sm_{cap[0]}{cap[1]}"})
    return found


def _parse_shape(text: str):
    try:
        B, N, H, D, Lt, L = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--shape: expected six integers B,N,H,D,Lt,L_ip, got {text!r}")
    if min(B, N, H, D, Lt, L) < 1:
        raise SystemExit(f"--shape: every size must be >= 1, got {text!r}")
    return B, N, H, D, Lt, L


def dispatch_table(shape, dtypes) -> list:
    from instantstyle.kernels import explain_dispatch

    B, N, H, D, Lt, L = shape
    rows = []
    for dev in devices():
        for dtype_name in dtypes:
            make = lambda *s: torch.empty(*s, dtype=DTYPES[dtype_name], device=dev["device"])  # noqa: E731
            decision = explain_dispatch(make(B, N, H, D), make(B, Lt, H, D), make(B, Lt, H, D), [make(B, L, H, D)], [make(B, L, H, D)])
            rows.append({"device": dev["device"], "dtype": dtype_name, **decision.as_dict()})
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--shape", default=DEFAULT_SHAPE, help=f"B,N,H,D,Lt,L_ip (default {DEFAULT_SHAPE})")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="dtypes to report (repeatable; default all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    shape = _parse_shape(args.shape)
    report = {
        "versions": package_versions(),
        "devices": devices(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "shape": dict(zip(("B", "N", "H", "D", "Lt", "L_ip"), shape)),
        "dispatch": dispatch_table(shape, args.dtype or list(DTYPES)),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print("versions:  " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print("devices:   " + "; ".join(" ".join(str(x) for x in d.values()) for d in report["devices"]))
    print(f"shape:     {report['shape']}")
    for row in report["dispatch"]:
        print(f"{row['device']:8} {row['dtype']:9} -> {row['backend']}")
        for name, why in row["not_chosen"].items():
            print(f"{'':21}{name} not used: {why}")
    return 0
