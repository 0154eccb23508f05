"""Benchmark the fused decoupled-attention op (and the processors and a UNet step built on it)
against diffusers' IP-Adapter math, on the device present.

Suites:
  kernel     the op alone: ours (Triton, torch backend) vs diffusers' math (two SDPA calls,
             transposes, scale, add), xformers two-call (when installed), plain eager math;
             SDXL / SD1.5 shapes, long prompts, Plus / Full-face tokens, two adapters, batch 1/2/8
  processor  one attn2 call with projections: fused processor vs IPAdapterAttnProcessor2_0
  unet       one SDXL UNet step (random weights): no IP, InstantStyle style, style+layout, all blocks

GPU: CUDA events via triton.testing.do_bench (median, p20, p80) and CUDA-graph replay, inputs
rotated across buffers bigger than L2, roofline (bytes, FLOPs, GB/s, % of the copy bandwidth
measured in the same run).  CPU: median of time.perf_counter runs; the Triton kernel is listed
as "not timed (no GPU)".  Targets (fused >= 3x diffusers, >= 70% of copy bandwidth on Q + O)
are reported, never asserted.

Every run appends rows (tagged with device, versions, git commit, UTC time) to
RESULTS_DIR/<device>.jsonl and writes RESULTS_DIR/<device>.md and <device>.png.  Exit status 1
when an implementation raised (its row says "error: ..."), else 0, whatever the speedups.

examples:
  instantstyle bench --quick                      # every suite, small sizes (CI; < 2 min on 2 CPU cores)
  instantstyle bench --suite kernel               # the full kernel catalogue
  instantstyle bench --suite kernel --shape sdxl-4096x10 --dtype float16
  instantstyle bench --quick --json > rows.json   # rows on stdout, tables on stderr
  instantstyle bench --results-dir src/instantstyle/bench/results  # GPU numbers meant to be committed
  instantstyle bench --list                       # suites, shapes and providers
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _known_case_names() -> List[str]:
    from .shapes import all_shape_names
    from .suite_host import CASES as HOST_CASES
    from .suite_pack import CASES as PACK_CASES
    from .suite_processor import CASES
    from .suite_unet import PRESETS

    return all_shape_names() + [c.name for c in CASES] + list(PRESETS) + HOST_CASES + PACK_CASES


def _shape_filter(value: str) -> str:
    if not any(value in name for name in _known_case_names()):
        raise argparse.ArgumentTypeError(
            f"{value!r} matches no case; known: {', '.join(_known_case_names())} (see --list)")
    return value


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _device(value: str) -> str:
    if value not in ("auto", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda, got {value!r}")
    if value == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda requested, but torch.cuda.is_available() is False")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .providers import provider_names
    from .suites import suite_names

    parser.add_argument("--suite", choices=suite_names() + ["all"], default="all",
                        help="which suite to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats for every suite (what CI runs)")
    parser.add_argument("--json", action="store_true",
                        help="print this run's rows as JSON on stdout; human output goes to stderr")
    parser.add_argument("--results-dir", default="./bench-results", metavar="DIR",
                        help="where <device>.jsonl (appended), .md and .png go (default: ./bench-results)")
    parser.add_argument("--device", type=_device, default="auto", metavar="{auto,cpu,cuda}",
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), metavar="DTYPE",
                        help="float16, bfloat16 or float32; repeatable (default: GPU float16 and bfloat16, "
                             "float16 only with --quick; CPU float32)")
    parser.add_argument("--shape", action="append", type=_shape_filter, default=[], metavar="NAME",
                        help="only the case named NAME, or, if no case has that exact name, cases whose "
                             "name contains NAME; repeatable (see --list)")
    parser.add_argument("--provider", action="append", choices=provider_names(), default=[], metavar="NAME",
                        help=f"kernel suite: only these providers (+ the baseline); one of {', '.join(provider_names())}")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="CPU: torch threads (default: 1 with --quick, else torch's choice). On a shared "
                             "machine 1 gives steadier numbers: oversubscribed threads make some runs 10x slower")
    parser.add_argument("--no-graphs", action="store_true", help="GPU: skip CUDA-graph timing")
    parser.add_argument("--list", action="store_true", help="list suites, shapes and providers, then exit")


def _print_list(out) -> None:
    from .providers import KERNEL_PROVIDERS
    from .shapes import FULL_SHAPES, QUICK_SHAPES
    from .suite_processor import CASES, QUICK_CASES
    from .suite_unet import PRESETS
    from .suites import load_suite, suite_names

    print("suites:", file=out)
    for name in suite_names():
        print(f"  {name:10s} {load_suite(name).description}", file=out)
    print("kernel providers:", file=out)
    for p in KERNEL_PROVIDERS:
        print(f"  {p.name:12s} {p.description}{' (baseline)' if p.baseline else ''}", file=out)
    quick = {s.name for s in QUICK_SHAPES}
    print("kernel shapes (* = in --quick):", file=out)
    for s in FULL_SHAPES + [s for s in QUICK_SHAPES if s not in FULL_SHAPES]:
        print(f"  {'*' if s.name in quick else ' '} {s.name:30s} {s.describe():44s} {s.note}", file=out)
    print("processor cases (* = in --quick):", file=out)
    for c in CASES:
        print(f"  {'*' if c in QUICK_CASES else ' '} {c.name:30s} {c.describe()}", file=out)
    print("unet cases: no-ip, " + ", ".join(PRESETS), file=out)


def _resolve(args):
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.dtype:
        dtypes = [DTYPES[d] for d in dict.fromkeys(args.dtype)]
    elif device.type == "cuda":
        dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16]
    else:
        dtypes = [torch.float32]
    return device, dtypes


def _user_error(message: str) -> int:
    print(f"instantstyle: error: {message}", file=sys.stderr)
    return 2


def _no_case_message(args, suites: List[str]) -> str:
    """Why ``--shape`` selected nothing: a --quick-only case without --quick, or another suite's case."""
    from .shapes import FULL_SHAPES, QUICK_SHAPES

    quick_only = {s.name for s in QUICK_SHAPES} - {s.name for s in FULL_SHAPES}  # processor quick cases are a subset
    for f in args.shape:
        if not args.quick and any(f == n or f in n for n in quick_only):
            return f"--shape {f}: matches only --quick cases; add --quick (see --list)"
    return (f"--shape {', '.join(args.shape)}: matches no case of the {', '.join(suites)} suite(s) in this mode"
            f"{'' if args.quick else ' (full sizes)'}; see --list for each suite's cases")


def run(args) -> int:
    from tqdm import tqdm

    from . import results as R
    from . import timing
    from .plot import render_png
    from .suites import Context, dtype_name, load_suite, short_error, suite_names

    human = sys.stderr if args.json else sys.stdout
    if args.list:
        _print_list(human)
        return 0
    started = time.perf_counter()
    try:  # before minutes of timing: a run must never be lost to an unwritable dir
        R.check_results_dir(args.results_dir)
    except R.ResultsDirError as exc:
        return _user_error(str(exc))
    device, dtypes = _resolve(args)
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    meta = R.run_metadata(device, args.quick)
    ctx = Context(device=device, dtypes=dtypes, quick=args.quick, shape_filter=args.shape,
                  provider_filter=args.provider, graphs=not args.no_graphs)
    if device.type == "cuda":
        ctx.l2_bytes = timing.l2_bytes(device)
        ctx.copy_gbps = timing.copy_bandwidth_gbps(device)
        meta["copy_gbps"] = round(ctx.copy_gbps, 1)
        meta["l2_bytes"] = ctx.l2_bytes
        timer = "CUDA events (triton do_bench: median, p20, p80) + CUDA-graph replay, inputs rotated past L2"
    else:
        timer = "time.perf_counter: median (p20, p80) of repeated runs after warm-up"
        if args.dtype is None:
            ctx.note("CPU run in float32 (the GPU suites use float16/bfloat16; choose with --dtype).")
        if args.threads is None and threads == 1:
            ctx.note("CPU --quick runs on 1 thread (steadier on shared runners); choose with --threads.")
    print(f"instantstyle bench: {meta['device_name']}, {', '.join(dtype_name(d) for d in dtypes)}"
          f"{', quick' if args.quick else ''}; timer: {timer}", file=human)
    if ctx.copy_gbps:
        print(f"device copy bandwidth (read + write): {ctx.copy_gbps:.0f} GB/s", file=human)

    names = suite_names() if args.suite == "all" else [args.suite]
    suites, rows = [], []
    for name in names:
        try:
            suite = load_suite(name)
            why = suite.unavailable(ctx)
        except Exception as exc:  # a suite module that fails to import must not hide the others
            suite, why = None, short_error(exc)
        if why:
            ctx.note(f"{name} suite not run: {why}")
            rows.append({"suite": name, "case": "-", "provider": "-", "baseline": False, "dtype": "-",
                         "status": f"not available yet: {why}", "ms": None, "ms_graph": None})
        else:
            suites.append(suite)

    if args.shape:
        planned = {s.name: s.planned(ctx) for s in suites}
        if not any(planned.values()):
            return _user_error(_no_case_message(args, [s.name for s in suites]))
        for s in [s for s in suites if not planned[s.name]]:
            ctx.note(f"{s.name} suite not run: no {s.name} case matches --shape {', '.join(args.shape)}")
        suites = [s for s in suites if planned[s.name]]
    total = sum(s.planned(ctx) for s in suites)
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True, leave=True) as bar:
        def tick(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

        ctx.tick = tick
        ctx.working = lambda label: bar.set_postfix_str(label)
        for suite in suites:
            try:
                rows += suite.run(ctx)
            except Exception as exc:
                ctx.note(f"{suite.name} suite aborted: {short_error(exc)}")
                rows.append({"suite": suite.name, "case": "-", "provider": "-", "baseline": False, "dtype": "-",
                             "status": short_error(exc), "ms": None, "ms_graph": None})

    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    rows = [{**meta, **r} for r in rows]
    paths = R.results_paths(args.results_dir, meta["device_name"])
    R.append_jsonl(paths["jsonl"], rows)
    def warn(message: str) -> None:
        print(f"instantstyle bench: warning: {message}", file=sys.stderr)
        ctx.note(message)

    stored = R.read_jsonl(paths["jsonl"], run_id=meta["run_id"], warn=warn)  # plots and tables come from the data
    png_name = None
    try:
        render_png(stored, paths["png"], title=f"{meta['device_name']}  {meta['time_utc']}  {meta['git_commit'][:12]}")
        png_name = paths["png"].name
    except Exception as exc:
        ctx.note(f"plot not written: {short_error(exc)}")
    paths["md"].write_text(R.render_markdown(stored, ctx.notes, meta, png_name), encoding="utf-8")

    print(R.render_text(stored, ctx.notes), file=human)
    print(f"rows appended to {paths['jsonl']}; tables in {paths['md']}"
          f"{'; plot in ' + str(paths['png']) if png_name else ''}  ({meta['elapsed_s']} s)", file=human)
    if args.json:
        json.dump(stored, sys.stdout, indent=1)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 1 if any(str(r.get("status", "")).startswith("error") for r in stored) else 0
