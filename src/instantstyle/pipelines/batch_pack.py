"""``stylize-batch --pack N``: rows that share the model settings run N at a time, one batched call.

A row's image depends only on the row: each row keeps its own seed (a generator per row),
its own references (the processors pair image i with prompt i, see ``InstantStyle``), its
own content prompt and negative image.  What must agree inside one call is what one call
can only have once, the ``pack_key``: target, scale, controls, steps, size, the number of
style images, whether a negative prompt is given.  Rows are checked one by one first
(skipped, stale and bad rows never enter a pack); a pack whose call fails is run again row
by row, so one bad row (an unreadable image) fails only itself.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

from .batch import RowResult, _failed, _finish_row, _Pending, _prepare_row


def run_packed(jobs, out_dir: str, ext: str, base_seed: int, rank: int, generate, generate_many, save,
               tick: Callable[[], None], defaults: dict, redo: bool, pack: int, pack_key) -> List[RowResult]:
    results: List[RowResult] = []
    digests: Dict[str, str] = {}
    waiting: Dict[str, List[_Pending]] = {}  # pack key -> rows not run yet, in manifest order

    def run(rows: List[_Pending]) -> None:
        if len(rows) > 1:
            start = time.perf_counter()
            try:
                outputs = generate_many([r.job for r in rows], [r.seed for r in rows])
            except Exception:  # noqa: BLE001 - some row of the pack is bad: find it row by row
                outputs = None
            if outputs is not None:
                seconds = (time.perf_counter() - start) / len(rows)
                for row, (image, details) in zip(rows, outputs):
                    try:
                        results.append(_finish_row(row, image, dict(details, packed=len(rows)), seconds, rank, save))
                    except Exception as exc:  # noqa: BLE001 - e.g. the disk is full: this row only
                        results.append(_failed(row.job, exc, out_dir, ext, base_seed, rank))
                    tick()
                return
        for row in rows:
            try:
                start = time.perf_counter()
                image, details = generate(row.job, row.seed)
                results.append(_finish_row(row, image, details, time.perf_counter() - start, rank, save))
            except Exception as exc:  # noqa: BLE001 - one bad row must not end the run
                results.append(_failed(row.job, exc, out_dir, ext, base_seed, rank))
            tick()

    for job in jobs:
        try:
            row = _prepare_row(job, out_dir, ext, base_seed, rank, defaults, redo, digests)
        except Exception as exc:  # noqa: BLE001
            results.append(_failed(job, exc, out_dir, ext, base_seed, rank))
            tick()
            continue
        if isinstance(row, RowResult):
            results.append(row)
            tick()
            continue
        key = pack_key(row.job, row.settings) if pack_key is not None else ""
        waiting.setdefault(key, []).append(row)
        if len(waiting[key]) == pack:
            run(waiting.pop(key))
    for rows in waiting.values():
        run(rows)
    results.sort(key=lambda r: r.index)
    return results
