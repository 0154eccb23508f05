"""Batch stylization: a manifest of jobs, data-parallel over processes, resumable, never fatal per row.

The engine behind ``instantstyle stylize-batch``; no argparse here.

* **Manifest** (:mod:`.manifest`): JSONL (one object per line) or CSV, one job per row:
  ``prompt``, ``style`` (a path or a list of paths; in CSV a JSON list or paths joined by
  ``|``; relative to the manifest), optional ``negative_prompt``, ``seed``, ``scale``,
  ``target``, ``content_prompt``, ``content_scale``, ``name`` (output stem; default the row
  number).  Names are data, never paths: a bad one fails its row under the key ``row-<index>``.
* **Sharding**: every process computes the same row list and takes its slice with accelerate's
  ``PartialState.split_between_processes`` (works under ``accelerate launch`` and ``torchrun``,
  and as one plain process).  Rows are assigned before any skipping, so processes never race on
  which rows are left.
* **Seeds**: row ``i`` uses its own ``seed`` or ``--seed + i`` on a fresh CPU generator, so its
  image does not depend on which process runs it or what ran before.
* **Resume**: a row is done when its sidecar ``<name>.png.json`` says ``ok`` and records the
  hash of the row's effective settings (:func:`effective_settings`, style images by content).
  The sidecar is written after the image and both atomically, so a killed run leaves only whole
  files.  A row whose settings changed since is redone (``redo=False``: reported ``stale``, the
  old image kept and the summary saying so), never silently kept.
* **Failures**: whatever a row holds, it fails that row only: ``<name>.png.error.json`` (none
  for a row without a usable name) and the run goes on; the summary lists it with its reason.
* **Containment**: every path the batch writes or removes goes through :func:`out_file`, which
  resolves it (symlinks included) and refuses anything that is not a direct child of ``--out``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from .cli_args import SEED_MAX
from .manifest import FIELDS, Job, check_name, read_manifest, row_key  # noqa: F401  (re-exported: the batch's API)
from .outputs import TEMP_PREFIX, sidecar_path, write_json

SUMMARY = "summary.json"
STATUSES = ("ok", "skipped", "stale", "failed")
#: per-row fields a run-wide flag gives a default for (``--scale`` for ``scale``, ...)
ROW_DEFAULTS = ("negative_prompt", "scale", "target", "content_prompt", "content_scale")
#: the IP-Adapter controls and the negative style image: per row or from a flag, and in the
#: settings (and so the hash) only when set, so rows made before they existed keep their hash
CONTROL_DEFAULTS = ("weight_type", "embeds_scaling", "composition_weight", "negative_style")


class OutsideOut(ValueError):
    """A path the batch was about to write resolves outside ``--out``."""


def out_file(out_dir: str, filename: str) -> str:
    """``out_dir/filename``, proved to resolve (symlinks followed) to a direct child of ``out_dir``.

    Names are checked long before this; this is the check at the write site itself, so no
    future path into the batch's writes can escape the output folder."""
    root = os.path.realpath(out_dir)
    path = os.path.join(out_dir, filename)
    real = os.path.realpath(path)
    if os.path.dirname(real) != root or os.path.basename(real) in ("", ".", ".."):
        raise OutsideOut(f"refused to write {filename!r}: it resolves to {real!r}, outside --out {root!r}")
    return path


def row_seed(job: Job, base_seed: int) -> int:
    """The row's own seed, else ``base_seed + index``; ValueError when that passes 2**64 - 1."""
    if job.seed is not None:
        return job.seed
    seed = base_seed + job.index
    if seed > SEED_MAX:
        raise ValueError(f"seed: expected --seed + row index <= {SEED_MAX}, got {base_seed} + {job.index}; "
                         "give this row its own seed or use a smaller --seed")
    return seed


def output_path(out_dir: str, job: Job, ext: str) -> str:
    return out_file(out_dir, job.name + ext)


def effective_settings(job: Job, seed: int, defaults: dict) -> dict:
    """Everything that decides the row's image: its fields, the flags' defaults for the fields it
    leaves out, and the run-wide settings in ``defaults`` (model, steps, size, ...)."""
    settings = {k: v for k, v in defaults.items() if k not in ROW_DEFAULTS + CONTROL_DEFAULTS}
    for key in ROW_DEFAULTS:
        value = getattr(job, key)
        settings[key] = value if value is not None else defaults.get(key)
    for key in CONTROL_DEFAULTS:
        value = getattr(job, key, None)
        value = value if value is not None else defaults.get(key)
        if value is not None:
            settings[key] = value
    settings.update(prompt=job.prompt, style=list(job.style), seed=seed)
    if getattr(job, "frames", None) is not None:  # a video row's own frame count (else --frames, in defaults)
        settings["frames"] = job.frames
    return settings


def _file_digest(path: str, cache: Dict[str, str]) -> str:
    if path not in cache:
        try:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            cache[path] = digest.hexdigest()
        except OSError as exc:
            cache[path] = f"unreadable ({type(exc).__name__})"
    return cache[path]


def settings_hash(settings: dict, style_digests: List[str]) -> str:
    """sha256 of the effective settings and the style images' bytes: an edited row, flag or
    reference image changes it."""
    text = json.dumps({"settings": settings, "style_sha256": style_digests}, sort_keys=True, default=str,
                      ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def completed_record(image: str) -> Optional[dict]:
    """The ``ok`` sidecar of a complete output (sidecar written after its image, both atomically)."""
    try:
        with open(sidecar_path(image), encoding="utf-8") as f:
            record = json.load(f)
        return record if record.get("status") == "ok" and os.path.isfile(image) else None
    except (OSError, ValueError, AttributeError):
        return None


def is_complete(image: str) -> bool:
    return completed_record(image) is not None


def remove_stale_temporaries(out_dir: str) -> int:
    """Temporary files a killed run left behind (never complete outputs)."""
    stale = [f for f in os.listdir(out_dir) if f.startswith(TEMP_PREFIX)]
    for name in stale:
        try:
            os.unlink(out_file(out_dir, name))
        except (OSError, OutsideOut):
            pass
    return len(stale)


@dataclass
class RowResult:
    index: int
    name: str
    status: str  # ok | skipped (already complete) | stale (changed, not redone: redo=False) | failed
    rank: int
    seed: Optional[int] = None
    reason: Optional[str] = None
    seconds: Optional[float] = None


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:500]}"


@dataclass
class _Pending:
    """A row that is to run: what its image's record needs."""
    job: Job
    seed: int
    image_path: str
    sidecar: str
    error_path: str
    settings: dict
    digest: str
    redone: bool


def _prepare_row(job: Job, out_dir: str, ext: str, base_seed: int, rank: int, defaults: dict, redo: bool,
                 digests: Dict[str, str]):
    """A row's result when it needs no run (skipped, stale), else its :class:`_Pending`; raises for a bad row."""
    if job.error is not None:
        raise ValueError(job.error)
    seed = row_seed(job, base_seed)
    image_path = output_path(out_dir, job, ext)
    sidecar, error_path = out_file(out_dir, job.name + ext + ".json"), out_file(out_dir, job.name + ext + ".error.json")
    settings = effective_settings(job, seed, defaults)
    images = list(job.style) + ([settings["negative_style"]] if settings.get("negative_style") else [])
    digest = settings_hash(settings, [_file_digest(p, digests) for p in images])
    done = completed_record(image_path)
    if done is not None and done.get("settings_hash") == digest:
        return RowResult(job.index, job.name, "skipped", rank, seed, "already complete")
    if done is not None and not redo:
        return RowResult(job.index, job.name, "stale", rank, seed,
                         "changed since its image was made (settings hash differs); --no-redo kept the old image: "
                         "rerun without --no-redo to redo it")
    return _Pending(job, seed, image_path, sidecar, error_path, settings, digest, done is not None)


def _finish_row(row: _Pending, image, details: dict, seconds: float, rank: int, save) -> RowResult:
    job = row.job
    record = {"status": "ok", "row": job.fields(), "seed": row.seed, "rank": rank, **details,
              "settings": row.settings, "settings_hash": row.digest, "seconds": round(seconds, 3)}
    save(image, row.image_path, record)  # the image first, then its sidecar: the sidecar marks it done
    write_json(row.sidecar, record)
    if os.path.lexists(row.error_path):
        os.unlink(row.error_path)
    return RowResult(job.index, job.name, "ok", rank, row.seed, "redone: settings changed" if row.redone else None,
                     seconds=record["seconds"])


def _run_row(job: Job, out_dir: str, ext: str, base_seed: int, rank: int, generate, save, defaults: dict,
             redo: bool, digests: Dict[str, str]) -> RowResult:
    """One row, start to end; raises for a failing row (the caller records it)."""
    row = _prepare_row(job, out_dir, ext, base_seed, rank, defaults, redo, digests)
    if isinstance(row, RowResult):
        return row
    start = time.perf_counter()
    image, details = generate(job, row.seed)
    return _finish_row(row, image, details, time.perf_counter() - start, rank, save)


def _failed(job: Job, exc: BaseException, out_dir: str, ext: str, base_seed: int, rank: int) -> RowResult:
    """A failing row's result, and its error file where it has a name."""
    reason = _reason(exc)
    try:
        seed = row_seed(job, base_seed)
    except ValueError:
        seed = None
    if job.writes_files:
        try:
            write_json(out_file(out_dir, job.name + ext + ".error.json"),
                       {"status": "failed", "row": job.index, "name": job.name, "reason": reason, "rank": rank})
        except Exception as also:  # e.g. the disk is full: the summary still has the reason
            reason += f" (and its error file could not be written: {_reason(also)})"
    return RowResult(job.index, job.name, "failed", rank, seed, reason)


def run_shard(jobs: List[Job], out_dir: str, ext: str, base_seed: int, rank: int,
              generate: Callable[[Job, int], tuple], save: Callable[[object, str, dict], None],
              tick: Callable[[], None] = lambda: None, defaults: Optional[dict] = None,
              redo: bool = True, pack: int = 1, generate_many=None, pack_key=None) -> List[RowResult]:
    """Run this process's rows; ``generate(job, seed) -> (image, details)`` raises on a bad row.

    ``pack`` > 1 with ``generate_many(jobs, seeds) -> [(image, details)]``: rows whose
    ``pack_key(settings)`` agree run up to ``pack`` at a time in one batched call (see
    :mod:`.batch_pack`); sidecars, resume and hashes stay per row.

    No row ends the run: every exception a row raises (and one its error file raises) is that
    row's ``failed`` result.  ``defaults`` holds the flags' values (see :func:`effective_settings`)."""
    if pack > 1 and generate_many is not None:
        from .batch_pack import run_packed

        return run_packed(jobs, out_dir, ext, base_seed, rank, generate, generate_many, save, tick, defaults or {},
                          redo, pack, pack_key)
    results, digests = [], {}
    for job in jobs:
        try:
            results.append(_run_row(job, out_dir, ext, base_seed, rank, generate, save, defaults or {}, redo, digests))
        except Exception as exc:  # one bad row must not end the run; the summary says why
            results.append(_failed(job, exc, out_dir, ext, base_seed, rank))
        tick()
    return results


def rank_results_path(out_dir: str, rank: int) -> str:
    return out_file(out_dir, f".rank-{rank}.results.json")


def merge_summary(out_dir: str, world: int, total: int, settings: dict) -> dict:
    """Rank 0, after everyone finished: the per-rank result files -> ``summary.json``.

    A rank whose results file is missing (it died) leaves its rows out; the summary says so."""
    rows, missing = [], []
    for r in range(world):
        path = rank_results_path(out_dir, r)
        try:
            with open(path, encoding="utf-8") as f:
                rows += json.load(f)
            os.unlink(path)
        except (OSError, ValueError):
            missing.append(r)
    rows.sort(key=lambda row: row["index"])
    counts = {s: sum(row["status"] == s for row in rows) for s in STATUSES}
    summary = {"rows": total, **counts, "processes": world, "settings": settings,
               "failed_rows": [row for row in rows if row["status"] == "failed"],
               "stale_rows": [row for row in rows if row["status"] == "stale"], "results": rows}
    if missing:
        summary["ranks_without_results"] = missing
    write_json(out_file(out_dir, SUMMARY), summary)
    return summary
