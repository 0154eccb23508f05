"""Run metadata, the JSON-lines results file, and the tables (terminal and markdown).

Every row carries the run's metadata (device, versions, git commit, UTC time, run id),
so a results file can mix runs and devices and still be read back row by row.  Files
in the results dir are named after the device, so GPU results can be committed side
by side (``src/instantstyle/bench/results/nvidia-h100-80gb-hbm3.jsonl``)::

    <device-slug>.jsonl   every run appends its rows
    <device-slug>.md      this run's tables (overwritten)
    <device-slug>.png     this run's plot, rendered from the rows read back from the .jsonl
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

# --------------------------------------------------------------------------- metadata


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:
        return "absent"
    return str(getattr(mod, "__version__", "unknown"))


def _checkout_root() -> Optional[Path]:
    """The instantstyle git checkout: the package's own folder (editable install) or, for an
    installed copy run from the repository (as CI does), the working directory."""
    for start in (Path(__file__).resolve().parent.parent, Path.cwd()):
        try:
            out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=start, capture_output=True,
                                 text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None  # no git at all
        root = Path(out.stdout.strip()) if out.returncode == 0 else None
        if root and (root / "bench").is_dir() and (root / "kernels").is_dir():
            return root
    return None


def git_commit() -> str:
    """HEAD of the instantstyle checkout (``-dirty`` with uncommitted changes), or "unknown"."""
    root = _checkout_root()
    if root is None:
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if out.returncode != 0 or not out.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(name: str) -> str:
    """File-name form of a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    name = re.sub(r"\(r\)|\(tm\)|\(\d+ threads\)", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return slug[:60].strip("-") or "device"


def run_metadata(device: torch.device, quick: bool) -> dict:
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6],
        "time_utc": now.isoformat().replace("+00:00", "Z"),
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "xformers": _version("xformers"),
        "cuda": torch.version.cuda or "none",
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "quick": quick,
    }


# --------------------------------------------------------------------------- files


def results_paths(results_dir: os.PathLike, device_name_: str) -> Dict[str, Path]:
    base = Path(results_dir) / device_slug(device_name_)
    return {"jsonl": base.with_suffix(".jsonl"), "md": base.with_suffix(".md"), "png": base.with_suffix(".png")}


class ResultsDirError(Exception):
    """The results dir can't take this run's files (checked before anything is timed)."""


def check_results_dir(results_dir: os.PathLike) -> Path:
    """Create the dir and prove it takes files *before* minutes of timing, so a run is never lost."""
    path = Path(results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ResultsDirError(f"--results-dir {str(path)!r}: not writable ({exc.strerror or exc})") from None
    return path


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append rows, one JSON object per line.  A file whose last line was cut off (a killed run,
    a full disk) first gets its missing newline, so the new first row stays a line of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write("".join(json.dumps(row, sort_keys=False, allow_nan=True) + "\n" for row in rows).encode())


def read_jsonl(path: Path, run_id: Optional[str] = None, warn=None) -> List[dict]:
    """Rows of a results file.  Lines that are not JSON objects (corruption, a truncated write) are
    skipped, never fatal, and reported through ``warn(message)`` with their line numbers; the file
    itself is left as it is (its other runs are intact)."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                bad.append(number)
                continue
            if run_id is None or row.get("run_id") == run_id:
                rows.append(row)
    if bad and warn is not None:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        warn(f"{path}: skipped {len(bad)} unreadable line(s) ({shown}); the other rows are intact")
    return rows


def latest_run_id(rows: Sequence[dict]) -> Optional[str]:
    return rows[-1]["run_id"] if rows else None


# --------------------------------------------------------------------------- tables


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"



def _overhead_table(rows) -> tuple:
    """UNet overhead over diffusers' no-IP step, and over the same processors without IP."""
    pct = lambda v: "" if v is None else f"{v:+.1f}%"  # noqa: E731
    return (["case", "provider", "ms/step", "over diffusers' no-ip", "over own no-ip"],
            [[r["case"], r["provider"], fmt_ms(r["ms"]), pct(r["overhead_pct"]), pct(r.get("overhead_own_pct"))] for r in rows])

def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


#: what each provider / case label means; printed under the tables so the output explains itself
LABELS = {
    "diffusers": "diffusers' math (IPAdapterAttnProcessor2_0: two SDPA calls, transposes, scale, add): the baseline",
    "ours-triton": "instantstyle's op on the fused Triton kernel (one launch, Q read once, O written once)",
    "ours-torch": "instantstyle's op on its PyTorch backend (SDPA on views, in-place accumulation)",
    "xformers": "diffusers' math on xformers' memory_efficient_attention",
    "eager": "plain reference math (matmul, softmax, matmul in the input dtype; no SDPA): an unoptimised floor",
    "fused": "our fused processor as a drop-in for diffusers' (UNet: every attn2, scale 0 outside the targets as "
             "diffusers gates; Flux/SD3: the fused subclass of diffusers' IP processor); in the unet suite's no-ip row, "
             "our processors without IP",
    "fused-targeted": "instantstyle.load_ip_adapter(target=...): IP weights only in the target blocks (what users get)",
    "no-ip": "no IP-Adapter at all (text attention only): a reference for the overhead, a different workload, "
             "never a speedup",
}


def is_reference(row: dict) -> bool:
    """No-IP rows time a different workload: shown as a reference, never as a speedup."""
    return row.get("provider") == "no-ip" or row.get("case") == "no-ip"


def label_lines(rows: Sequence[dict]) -> List[str]:
    seen = OrderedDict.fromkeys(x for r in rows for x in (r.get("provider"), r.get("case")) if x in LABELS)
    return [f"{name}: {LABELS[name]}" for name in seen]


def _cell(row: dict, key: str) -> str:
    if row.get("status") != "ok":
        return row.get("status", "?")
    ms = row.get(key)
    if ms is None:
        return row.get(f"{key}_status") or "-"
    if is_reference(row):
        return f"{fmt_ms(ms)} (reference)"
    ratio = row.get("speedup" if key == "ms" else "speedup_graph")
    return f"{fmt_ms(ms)} ({fmt_ratio(ratio)})" if not row.get("baseline") else f"{fmt_ms(ms)} (base)"


def pivot(rows: Sequence[dict], key: str = "ms") -> tuple:
    """(header, body): one line per (case, dtype), one column per provider, in first-seen order."""
    providers: List[str] = []
    lines: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in rows:
        if r["provider"] not in providers:
            providers.append(r["provider"])
        lines.setdefault((r["case"], r["dtype"]), {"_shape": r.get("shape_desc", "")})[r["provider"]] = r
    header = ["case", "dtype", "shape"] + providers
    body = [[case, dtype, cells["_shape"]] + [(_cell(cells[p], key) if p in cells else "") for p in providers]
            for (case, dtype), cells in lines.items()]
    return header, body


def text_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in b) + " |" for b in body]
    return "\n".join(lines)


def roofline_table(rows: Sequence[dict]) -> tuple:
    header = ["case", "dtype", "provider", "timer", "time", "bytes (MB)", "GFLOP", "FLOP/B", "GB/s", "GB/s Q+O",
              "% copy BW", "% copy BW Q+O"]
    body = []
    for r in rows:
        if r.get("status") != "ok" or r.get("bytes") is None:
            continue
        for key, timer in (("ms", r.get("ms_method", "")), ("ms_graph", "cuda-graph")):
            rf = r.get("roofline_graph") if key == "ms_graph" else r
            if r.get(key) is None or not rf:
                continue
            pct = lambda v: "-" if v is None else f"{v:.0f}%"  # noqa: E731
            body.append([r["case"], r["dtype"], r["provider"], timer, fmt_ms(r[key]), f"{r['bytes'] / 1e6:.1f}",
                         f"{r['flops'] / 1e9:.2f}", f"{r['intensity_flop_per_byte']:.0f}", f"{rf['gbps']:.3g}",
                         f"{rf['gbps_qo']:.3g}", pct(rf.get("pct_copy_bw")), pct(rf.get("pct_copy_bw_qo"))])
    return header, body


def target_lines(rows: Sequence[dict]) -> List[str]:
    out = []
    for r in rows:
        if "target" not in r:
            continue
        t = r["target"]
        out.append(f"{r['suite']}/{r['case']}/{r['dtype']}/{r['provider']}: {t['verdict']}")
    return out


def env_lines(meta: dict) -> List[str]:
    keys = ["device_name", "torch", "triton", "diffusers", "xformers", "cuda", "python", "cpu_threads", "git_commit",
            "time_utc", "run_id", "copy_gbps", "l2_bytes", "elapsed_s"]
    return [f"{k}: {meta[k]}" for k in keys if k in meta]


def render_text(rows: Sequence[dict], notes: Sequence[str]) -> str:
    parts = []
    for suite in OrderedDict.fromkeys(r["suite"] for r in rows):
        srows = [r for r in rows if r["suite"] == suite]
        parts.append(f"== {suite} suite: median time (speedup = baseline time / time; >1 is faster; no-ip = reference) ==")
        parts.append(text_table(*pivot(srows, "ms")))
        if any(r.get("ms_graph") is not None for r in srows):
            parts.append(f"-- {suite} suite, CUDA-graph replay --")
            parts.append(text_table(*pivot(srows, "ms_graph")))
        fused = [r for r in srows if r["provider"] == "ours-triton" and r.get("pct_copy_bw") is not None]
        if fused:  # the full roofline (every provider) is in the markdown
            parts.append(f"-- {suite} suite, roofline of the fused kernel (copy bandwidth measured in this run) --")
            parts.append(text_table(*roofline_table(fused)))
        extra = [r for r in srows if r.get("overhead_pct") is not None]
        if extra:
            parts.append(f"-- {suite} suite, overhead over no IP-Adapter --")
            parts.append(text_table(*_overhead_table(extra)))
    labels = label_lines(rows)
    if labels:
        parts.append("== labels ==")
        parts.extend(labels)
    targets = target_lines(rows)
    if targets:
        parts.append("== targets (reported, never asserted) ==")
        parts.extend(targets)
    if notes:
        parts.append("== notes ==")
        parts.extend(f"- {n}" for n in notes)
    return "\n".join(parts)


def render_markdown(rows: Sequence[dict], notes: Sequence[str], meta: dict, png_name: Optional[str]) -> str:
    parts = [f"# instantstyle bench: {meta.get('device_name', '?')}", ""]
    parts += [f"- {line}" for line in env_lines(meta)] + [""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    for suite in OrderedDict.fromkeys(r["suite"] for r in rows):
        srows = [r for r in rows if r["suite"] == suite]
        parts += [f"## {suite} suite", "", "Median time; in brackets the speedup over the baseline "
                  "(baseline time / time, measured in the same run); no-IP rows are a reference.", "", markdown_table(*pivot(srows, "ms")), ""]
        if any(r.get("ms_graph") is not None for r in srows):
            parts += ["CUDA-graph replay:", "", markdown_table(*pivot(srows, "ms_graph")), ""]
        header, body = roofline_table(srows)
        if body:
            parts += ["Roofline (ideal fused traffic: Q read + K/V read + O written):", "",
                      markdown_table(header, body), ""]
        extra = [r for r in srows if r.get("overhead_pct") is not None]
        if extra:
            parts += ["Overhead over no IP-Adapter:", "",
                      markdown_table(*_overhead_table(extra)), ""]
    labels = label_lines(rows)
    if labels:
        parts += ["## Labels", ""] + [f"- {line}" for line in labels] + [""]
    targets = target_lines(rows)
    if targets:
        parts += ["## Targets (reported, never asserted)", ""] + [f"- {t}" for t in targets] + [""]
    if png_name:
        parts += ["## Plot", "", f"![speedups]({png_name})", ""]
    return "\n".join(parts)
