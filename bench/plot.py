"""The PNG: rendered from result rows (as read back from the JSON-lines file), never from live timers.

* one panel per kernel/processor suite: speedup over the baseline per case, one bar
  per provider (CUDA-graph speedups too when measured), a dashed line at 1x and, for
  the kernel suite on a GPU, the 3x target;
* when the unet suite ran: time per UNet step per variant.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .suite_kernel import TARGET_SPEEDUP  # noqa: E402


def _speedup_panel(ax, rows: Sequence[dict], suite: str, gpu: bool) -> None:
    cases = list(OrderedDict.fromkeys(f"{r['case']}\n{r['dtype']}" for r in rows))
    series: "OrderedDict[str, dict]" = OrderedDict()
    for r in rows:
        if r.get("baseline") or r.get("status") != "ok":
            continue
        key = f"{r['case']}\n{r['dtype']}"
        if r.get("speedup") is not None:
            series.setdefault(r["provider"], {})[key] = r["speedup"]
        if r.get("speedup_graph") is not None:
            series.setdefault(r["provider"] + " (graph)", {})[key] = r["speedup_graph"]
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, c in enumerate(cases) if c in values]
        ax.bar(xs, [values[c] for c in cases if c in values], width, label=name,
               hatch="//" if name.endswith("(graph)") else None)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    if suite == "kernel" and gpu:
        ax.axhline(TARGET_SPEEDUP, color="red", linestyle=":", linewidth=1, label=f"target {TARGET_SPEEDUP:g}x")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speedup over baseline (x)")
    base = next((r["provider"] for r in rows if r.get("baseline")), "baseline")
    ax.set_title(f"{suite} suite: speedup vs {base}")
    if series:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no timed rows besides the baseline", ha="center", va="center", transform=ax.transAxes)


def _unet_panel(ax, rows: Sequence[dict]) -> None:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ms") is not None]
    labels = [f"{r['case']}\n{r['provider']}" for r in ok]
    ax.bar(range(len(ok)), [r["ms"] for r in ok],
           color=["tab:gray" if r["case"] == "no-ip" else ("tab:blue" if r["provider"] == "fused" else "tab:orange")
                  for r in ok])
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("ms per UNet step")
    desc = ok[0].get("shape_desc", "") if ok else ""
    ax.set_title(f"unet suite: time per step ({desc})", fontsize=9)


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
