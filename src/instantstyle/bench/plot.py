"""The PNG: rendered from result rows (as read back from the JSON-lines file), never from live timers.

* one panel per kernel/processor suite: speedup over the baseline per case, one bar
  per provider (CUDA-graph speedups too when measured) with p20-p80 error bars, a dashed
  line at 1x and, for the kernel suite on a GPU, the 3x target;
* when the unet suite ran: time per UNet step per case, one colour per provider (legend),
  p20-p80 error bars, and no-IP as a reference line (it is another workload, not a speedup).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .suite_kernel import TARGET_SPEEDUP  # noqa: E402


def _speedup_errors(row: dict, key: str) -> tuple:
    """(down, up) error of a speedup from the row's own p20/p80 times (baseline held at its median)."""
    ms, p20, p80 = row.get(key), row.get(f"{key}_p20"), row.get(f"{key}_p80")
    speedup = row.get("speedup" if key == "ms" else "speedup_graph")
    if None in (ms, p20, p80, speedup) or not p20 or not p80:
        return 0.0, 0.0
    base = speedup * ms  # the baseline's median
    return max(0.0, speedup - base / p80), max(0.0, base / p20 - speedup)


def _speedup_panel(ax, rows: Sequence[dict], suite: str, gpu: bool) -> None:
    cases = list(OrderedDict.fromkeys(f"{r['case']}\n{r['dtype']}" for r in rows))
    series: "OrderedDict[str, dict]" = OrderedDict()
    for r in rows:
        if r.get("baseline") or r.get("status") != "ok" or r.get("provider") == "no-ip":
            continue  # no-ip times another workload: a reference, not a speedup
        key = f"{r['case']}\n{r['dtype']}"
        if r.get("speedup") is not None:
            series.setdefault(r["provider"], {})[key] = (r["speedup"], _speedup_errors(r, "ms"))
        if r.get("speedup_graph") is not None:
            series.setdefault(r["provider"] + " (graph)", {})[key] = (r["speedup_graph"], _speedup_errors(r, "ms_graph"))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, c in enumerate(cases) if c in values]
        picked = [values[c] for c in cases if c in values]
        errs = [[e[0] for _, e in picked], [e[1] for _, e in picked]]
        ax.bar(xs, [v for v, _ in picked], width, yerr=errs, capsize=2, label=name, color=f"C{i}",
               hatch="//" if name.endswith("(graph)") else None)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8, label="baseline (1x)")
    if suite == "kernel" and gpu:
        ax.axhline(TARGET_SPEEDUP, color="red", linestyle=":", linewidth=1, label=f"target {TARGET_SPEEDUP:g}x")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speedup over baseline (x); bars: p20-p80")
    base = next((r["provider"] for r in rows if r.get("baseline")), "baseline")
    ax.set_title(f"{suite} suite: speedup vs {base}")
    ax.legend(fontsize=7)
    if not series:
        ax.text(0.5, 0.5, "no timed rows besides the baseline", ha="center", va="center", transform=ax.transAxes)


def _unet_panel(ax, rows: Sequence[dict]) -> None:
    """ms per step, one colour per provider (legend), p20-p80 error bars; no-ip as a reference line."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ms") is not None]
    bars = [r for r in ok if r["case"] != "no-ip"]
    cases = list(OrderedDict.fromkeys(r["case"] for r in bars))
    providers = list(OrderedDict.fromkeys(r["provider"] for r in bars))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        mine = {r["case"]: r for r in bars if r["provider"] == provider}
        xs = [j + (i - (len(providers) - 1) / 2) * width for j, c in enumerate(cases) if c in mine]
        picked = [mine[c] for c in cases if c in mine]
        errs = [[max(0.0, r["ms"] - (r.get("ms_p20") or r["ms"])) for r in picked],
                [max(0.0, (r.get("ms_p80") or r["ms"]) - r["ms"]) for r in picked]]
        ax.bar(xs, [r["ms"] for r in picked], width, yerr=errs, capsize=2, color=f"C{i}", label=provider)
    noip = next((r for r in ok if r["case"] == "no-ip"), None)
    if noip is not None:
        ax.axhline(noip["ms"], color="gray", linestyle="--", linewidth=1,
                   label=f"no IP-Adapter (reference): {noip['ms']:.3g} ms")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=8)
    ax.set_ylabel("ms per UNet step (bars: p20-p80)")
    desc = ok[0].get("shape_desc", "") if ok else ""
    ax.set_title(f"unet suite: time per step ({desc})", fontsize=9)
    ax.legend(fontsize=7)


def render_png(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    suites: List[str] = list(OrderedDict.fromkeys(r["suite"] for r in rows))
    if not suites:
        raise ValueError("no rows to plot")
    gpu = any(r.get("device") == "cuda" for r in rows)
    fig, axes = plt.subplots(len(suites), 1, figsize=(11, 4.2 * len(suites)), squeeze=False)
    for ax, suite in zip(axes[:, 0], suites):
        srows = [r for r in rows if r["suite"] == suite]
        if suite == "unet":
            _unet_panel(ax, srows)
        else:
            _speedup_panel(ax, srows, suite, gpu)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
