"""Report versions, devices, optional extras, and which attention backend would run.

For a given shape (default: an SDXL 1024x1024 cross-attention layer, B=2 CFG batch,
4096 queries, 10 heads of 64, 77 text tokens, one 4-token IP stream; L_ip = 0 means no
IP stream) it says which backend ``decoupled_attention`` would choose on each device and
dtype, EVERY reason each other backend was not chosen, and on CUDA the Triton tile
configuration the launcher would use with its issued vs useful multiply-accumulates
(issued: key columns the tiling computes, padding and the IP path's repeated QK^T pass
included; useful: one QK^T and one PV MAC per key and head dim).

``--device cuda --arch sm_90`` plans for a GPU that is not present (no memory is touched:
the shapes are meta tensors).

Examples:
  instantstyle info
  instantstyle info --shape 2,1024,20,64,77,16 --dtype bfloat16 --json
  instantstyle info --shape 2,4096,10,64,77,0 --dtype float16 --device cuda --arch sm_90 --json
"""
from __future__ import annotations

import importlib
import json
import os
import platform

import torch

from instantstyle.pipelines.errors import UserError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEVICES = ("cpu", "cuda")
DEFAULT_SHAPE = "2,4096,10,64,77,4"
SHAPE_NAMES = ("B", "N", "H", "D", "Lt", "L_ip")


class ArgumentError(UserError):
    """A bad command-line value: the CLI prints it as one line, ``instantstyle: error: ...``, exit 2
    (the prefix and exit code every command's mistakes get)."""


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


def parse_shape(text: str) -> tuple:
    parts = text.split(",")
    try:
        sizes = tuple(int(x) for x in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 6:
        raise ArgumentError(f"--shape: expected six integers B,N,H,D,Lt,L_ip, got {text!r}")
    if min(sizes[:5]) < 1 or sizes[5] < 0:
        raise ArgumentError(f"--shape: expected B,N,H,D,Lt >= 1 and L_ip >= 0 (0: no IP stream), got {text!r}")
    return sizes


def _decide(shape, dtype_name: str, device_type: str, capability) -> dict:
    """One row: backend, every reason, and on CUDA the tile config and MACs (meta tensors: no memory)."""
    from instantstyle.kernels.dispatch import Target, choose_backend
    from instantstyle.kernels.inputs import normalize_inputs
    from instantstyle.kernels.tiles import kernel_config, mac_count

    B, N, H, D, Lt, L = shape
    meta = lambda *s: torch.empty(*s, dtype=DTYPES[dtype_name], device="meta")  # noqa: E731
    ip_lens = (L,) if L else ()
    inputs = normalize_inputs(meta(B, N, H, D), meta(B, Lt, H, D), meta(B, Lt, H, D),
                              [meta(B, n, H, D) for n in ip_lens], [meta(B, n, H, D) for n in ip_lens])
    target = Target(device_type, capability)
    row = {"dtype": dtype_name, **choose_backend(inputs, "auto", target, explain=True).as_dict()}
    if target.arch is not None and 8 <= D <= 256:
        cfg = kernel_config(D, Lt, 0, ip_lens, dtype_name, target.arch)
        row["arch"] = target.arch
        row["triton_config"] = {"name": cfg.name, **{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
        row["macs"] = mac_count(cfg, (B, N, H, D, Lt), 0, ip_lens)
    return row


def dispatch_table(shape, dtypes, device=None, arch=None) -> list:
    """Rows for the devices present, or for the one named by ``device``/``arch``."""
    from instantstyle.kernels.dispatch import capability_of_arch

    if device is not None or arch is not None:
        device = device or "cuda"
        capability = capability_of_arch(arch or "sm_90") if device == "cuda" else None
        targets = [(f"{device} ({arch or 'sm_90'}, planned)" if device == "cuda" else device, device, capability)]
    else:
        targets = [("cpu", "cpu", None)]
        if torch.cuda.is_available():
            targets += [(f"cuda:{i}", "cuda", torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    return [{"device": label, **_decide(shape, dtype_name, device_type, cap)} for label, device_type, cap in targets
            for dtype_name in dtypes]


def add_arguments(parser) -> None:
    parser.add_argument("--shape", default=DEFAULT_SHAPE, help=f"B,N,H,D,Lt,L_ip; L_ip 0 = no IP stream (default {DEFAULT_SHAPE})")
    parser.add_argument("--dtype", action="append", help=f"dtypes to report (repeatable; {', '.join(DTYPES)}; default all)")
    parser.add_argument("--device", help="plan for this device type (cpu or cuda) instead of the devices present")
    parser.add_argument("--arch", help="with --device cuda: the GPU arch to plan for (sm_80, sm_86, sm_89, sm_90, sm_100)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _check_args(args) -> tuple:
    from instantstyle.kernels.tiles import ARCHS

    shape = parse_shape(args.shape)
    for name in args.dtype or ():
        if name not in DTYPES:
            raise ArgumentError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    if args.device is not None and args.device not in DEVICES:
        raise ArgumentError(f"--device: expected one of {', '.join(DEVICES)}, got {args.device!r}")
    if args.arch is not None:
        if args.arch not in ARCHS:
            raise ArgumentError(f"--arch: expected one of {', '.join(ARCHS)}, got {args.arch!r}")
        if args.device not in (None, "cuda"):
            raise ArgumentError(f"--arch: expected only with --device cuda, got --device {args.device}")
    return shape


def run(args) -> int:
    shape = _check_args(args)  # ArgumentError: cli.main prints it with the common prefix
    try:
        table = dispatch_table(shape, args.dtype or list(DTYPES), args.device, args.arch)
    except (ValueError, TypeError) as exc:  # a shape the planner refuses: the user's values, not a bug
        raise ArgumentError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    report = {
        "versions": package_versions(),
        "devices": devices(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "shape": dict(zip(SHAPE_NAMES, shape)),
        "dispatch": table,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print("versions:  " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print("devices:   " + "; ".join(" ".join(str(x) for x in d.values()) for d in report["devices"]))
    print(f"shape:     {report['shape']}")
    for row in report["dispatch"]:
        print(f"{row['device']:8} {row['dtype']:9} -> {row['backend']}")
        for name, whys in row["not_chosen"].items():
            for why in whys:
                print(f"{'':21}{name} not used: {why}")
        if "triton_config" in row:
            m = row["macs"]
            print(f"{'':21}triton tiles ({row['arch']}): {row['triton_config']['name']}; MACs issued/useful "
                  f"{m['ratio']} ({m['qk_columns']}+{m['pv_columns']} QK/PV key columns for {m['useful_columns']} keys)")
    return 0
