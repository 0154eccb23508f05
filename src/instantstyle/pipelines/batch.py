"""Batch stylization: a manifest of jobs, data-parallel over processes, resumable, never fatal per row.

The engine behind ``instantstyle stylize-batch``; no argparse here.

* **Manifest**: JSONL (one object per line) or CSV, one job per row: ``prompt``, ``style`` (a
  path or a list of paths; in CSV a JSON list or paths joined by ``|``; relative to the
  manifest), optional ``negative_prompt``, ``seed``, ``scale``, ``target``, ``content_prompt``,
  ``content_scale``, ``name`` (output stem; default the row number).
* **Sharding**: every process computes the same row list and takes its slice with accelerate's
  ``PartialState.split_between_processes`` (works under ``accelerate launch`` and ``torchrun``,
  and as one plain process).  Rows are assigned before any skipping, so processes never race on
  which rows are left.
* **Seeds**: row ``i`` uses its own ``seed`` or ``--seed + i`` on a fresh CPU generator, so its
  image does not depend on which process runs it or what ran before.
* **Resume**: a row is done when its sidecar ``<name>.png.json`` says ``ok``; the sidecar is
  written after the image and both atomically (temp file + rename), so a killed run leaves only
  whole files and the next run picks up the rest.
* **Failures**: a failing row (unreadable image, bad target, ...) gets ``<name>.error.json`` and
  the run goes on; the summary lists it with its reason.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

from .errors import UserError
from .outputs import TEMP_PREFIX, sidecar_path, write_json

FIELDS = ("prompt", "style", "negative_prompt", "seed", "scale", "target", "content_prompt", "content_scale", "name")
SUMMARY = "summary.json"


@dataclass
class Job:
    index: int
    name: str
    prompt: Optional[str] = None
    style: List[str] = field(default_factory=list)
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    scale: Optional[float] = None
    target: object = None
    content_prompt: Optional[str] = None
    content_scale: Optional[float] = None
    error: Optional[str] = None  # a row the manifest already gets wrong: reported, not run


def _rows(path: str) -> List[object]:
    """Raw rows: dicts, or the error text of a line that is not a JSON object."""
    with open(path, encoding="utf-8", newline="") as f:
        if path.lower().endswith(".csv"):
            return [{k: v for k, v in row.items() if k is not None and v not in (None, "")} for row in csv.DictReader(f)]
        rows = []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                row = f"line {number}: not JSON ({exc})"
            rows.append(row if isinstance(row, (dict, str)) else f"line {number}: expected a JSON object")
        return rows


def _styles(value, base: str) -> List[str]:
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [p for p in text.split("|") if p.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise ValueError(f"style: expected a path or a list of paths, got {value!r}")
    return [p if os.path.isabs(p) else os.path.join(base, p) for p in (p.strip() for p in value)]


def _number(name: str, value, kind):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if number < 0:
        raise ValueError(f"{name}: expected >= 0, got {value!r}")
    return number


def _job(index: int, row, base: str) -> Job:
    job = Job(index, str(index))
    if isinstance(row, str):
        job.error = row
        return job
    try:
        unknown = sorted(set(row) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(FIELDS)}")
        job.name = str(row.get("name", index))
        if not re.fullmatch(r"[\w.\-+= ,()]+", job.name) or job.name.startswith("."):
            raise ValueError(f"name: {job.name!r} is not a plain file stem (letters, digits, . - _ ...; no folders)")
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError("prompt: required (a non-empty string)")
        job.prompt, job.style = row["prompt"], _styles(row.get("style"), base)
        job.negative_prompt, job.content_prompt = row.get("negative_prompt"), row.get("content_prompt")
        if "seed" in row:
            job.seed = _number("seed", row["seed"], int)
        for key in ("scale", "content_scale"):
            if key in row:
                setattr(job, key, _number(key, row[key], float))
        target = row.get("target")
        if isinstance(target, str) and target.startswith("["):
            target = json.loads(target)  # a CSV cell holding a JSON list of module patterns
        job.target = target
    except (ValueError, TypeError) as exc:
        job.error = f"manifest row {index}: {exc}"
    return job


def read_manifest(path: str) -> List[Job]:
    """Every row as a :class:`Job` (bad rows carry ``error``); names must be unique."""
    if not os.path.isfile(path):
        raise UserError(f"MANIFEST: no such file: {path}")
    try:
        rows = _rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"MANIFEST: can't read {path}: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    jobs = [_job(i, row, base) for i, row in enumerate(rows)]
    if not jobs:
        raise UserError(f"MANIFEST: {path} has no rows")
    seen = {}
    for job in jobs:
        if job.name in seen and job.error is None:
            raise UserError(f"MANIFEST: rows {seen[job.name]} and {job.index} both write {job.name!r}; names must be unique")
        seen.setdefault(job.name, job.index)
    return jobs


def row_seed(job: Job, base_seed: int) -> int:
    return job.seed if job.seed is not None else base_seed + job.index


def output_path(out_dir: str, job: Job, ext: str) -> str:
    return os.path.join(out_dir, job.name + ext)


def is_complete(image: str) -> bool:
    """Done = an ``ok`` sidecar (written after its image, both atomically) and the image itself."""
    try:
        with open(sidecar_path(image), encoding="utf-8") as f:
            return json.load(f).get("status") == "ok" and os.path.isfile(image)
    except (OSError, ValueError, AttributeError):
        return False


def remove_stale_temporaries(out_dir: str) -> int:
    """Temporary files a killed run left behind (never complete outputs)."""
    stale = [f for f in os.listdir(out_dir) if f.startswith(TEMP_PREFIX)]
    for name in stale:
        try:
            os.unlink(os.path.join(out_dir, name))
        except OSError:
            pass
    return len(stale)


@dataclass
class RowResult:
    index: int
    name: str
    status: str  # ok | skipped (already complete) | failed
    rank: int
    seed: Optional[int] = None
    reason: Optional[str] = None
    seconds: Optional[float] = None


def run_shard(jobs: List[Job], out_dir: str, ext: str, base_seed: int, rank: int,
              generate: Callable[[Job, int], tuple], save: Callable[[object, str, dict], None],
              tick: Callable[[], None] = lambda: None) -> List[RowResult]:
    """Run this process's rows; ``generate(job, seed) -> (image, details)`` raises on a bad row."""
    results = []
    for job in jobs:
        image_path, seed = output_path(out_dir, job, ext), row_seed(job, base_seed)
        error_path = image_path + ".error.json"
        if job.error is None and is_complete(image_path):
            results.append(RowResult(job.index, job.name, "skipped", rank, seed, "already complete"))
            tick()
            continue
        start = time.perf_counter()
        try:
            if job.error is not None:
                raise ValueError(job.error)
            image, details = generate(job, seed)
            record = {"status": "ok", "row": asdict(job), "seed": seed, "rank": rank, **details,
                      "seconds": round(time.perf_counter() - start, 3)}
            record["row"].pop("error")
            save(image, image_path, record)  # the image first, then its sidecar: the sidecar marks it done
            write_json(sidecar_path(image_path), record)
            if os.path.exists(error_path):
                os.unlink(error_path)
            results.append(RowResult(job.index, job.name, "ok", rank, seed, seconds=record["seconds"]))
        except Exception as exc:  # one bad row must not end the run; the summary says why
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            write_json(error_path, {"status": "failed", "row": job.index, "name": job.name, "reason": reason, "rank": rank})
            results.append(RowResult(job.index, job.name, "failed", rank, seed, reason))
        tick()
    return results


def merge_summary(out_dir: str, world: int, total: int, settings: dict) -> dict:
    """Rank 0, after everyone finished: the per-rank result files -> ``summary.json``."""
    rows = []
    for r in range(world):
        path = os.path.join(out_dir, f".rank-{r}.results.json")
        with open(path, encoding="utf-8") as f:
            rows += json.load(f)
        os.unlink(path)
    rows.sort(key=lambda row: row["index"])
    counts = {s: sum(row["status"] == s for row in rows) for s in ("ok", "skipped", "failed")}
    summary = {"rows": total, **counts, "processes": world, "settings": settings,
               "failed_rows": [row for row in rows if row["status"] == "failed"], "results": rows}
    write_json(os.path.join(out_dir, SUMMARY), summary)
    return summary
