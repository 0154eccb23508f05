"""A ``stylize-batch`` manifest as a list of :class:`Job`: every row read, every problem a row's own.

A manifest is data from anywhere (a spreadsheet, a script, a colleague), so nothing in a row may
stop the run or steer a file outside ``--out``:

* **Encodings**: UTF-8 with or without the BOM Excel writes ("CSV UTF-8"), or UTF-16 with its
  BOM.  Bytes that are not UTF-8 fail only the rows that hold them (they are decoded with
  ``surrogateescape`` and any lone surrogate in a row is refused), not the whole file.
* **Names are data, never paths**: a row's ``name`` is checked before anything uses it (one
  path component of plain characters, not starting with ``.``, at most :data:`NAME_MAX_BYTES`
  bytes of UTF-8).  A row with a bad or duplicate name is reported under the key ``row-<index>``,
  which names no file: such a row writes nothing at all.
* **Numbers**: ``seed`` is an integer in [0, 2**64) (:func:`parse_seed`); scales are finite and
  >= 0 (``scale`` may be a list, one per block, for video rows); JSON's ``NaN``/``Infinity`` are refused, so every sidecar stays strict JSON.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import List, Optional

from .cli_args import check_control_name, parse_seed, shown
from .errors import UserError

FIELDS = ("prompt", "style", "negative_prompt", "seed", "scale", "target", "content_prompt", "content_scale",
          "weight_type", "embeds_scaling", "composition_weight", "negative_style", "frames", "name")  # name last: see Job.fields
#: a name's UTF-8 bytes: with ".jpeg.json" / ".png.error.json" and the temporary file's prefix
#: and random part, the longest file the batch writes stays under the usual 255-byte NAME_MAX
NAME_MAX_BYTES = 200
_NAME = re.compile(r"[\w.\-+= ,()]+")  # \w is Unicode-aware: letters and digits of any script
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Job:
    index: int
    name: str
    prompt: Optional[str] = None
    style: List[str] = field(default_factory=list)
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    scale: object = None  # a number, or (video rows) a list of numbers, one per block
    target: object = None
    content_prompt: Optional[str] = None
    content_scale: Optional[float] = None
    weight_type: Optional[str] = None
    embeds_scaling: Optional[str] = None
    composition_weight: Optional[float] = None
    negative_style: Optional[str] = None  # an image for the unconditional half (path)
    frames: Optional[int] = None  # video rows (--format gif/mp4): 4k+1 frames
    error: Optional[str] = None  # a row the manifest already gets wrong: reported, not run
    #: False when ``name`` is not the row's own checked name but its ``row-<index>`` key: the row
    #: then writes no file at all (only its summary entry)
    writes_files: bool = True

    def fields(self) -> dict:
        """The row as the manifest gave it (after parsing), for sidecars and PNG text."""
        return {k: getattr(self, k) for k in ("index", "name") + FIELDS[:-1]}


class _Unreadable(str):
    """A raw row that could not be parsed: its text is the reason."""


def row_key(index: int) -> str:
    """The summary key of a row that has no usable name: never a file name the batch writes."""
    return f"row-{index}"


def check_name(value) -> str:
    """``value`` as an output file stem, or ValueError saying what a name must be and what came."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # JSON `"name": 7`: the same file as the string "7"
    if not isinstance(value, str):
        raise ValueError(f"name: expected a string, got {shown(value)}")
    problem = None
    if not value:
        problem = "it is empty"
    elif len(value.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES:
        problem = f"it is longer than {NAME_MAX_BYTES} bytes"
    elif value.startswith("."):
        problem = "it starts with '.' ('.', '..' and hidden files are not output names)"
    elif "/" in value or "\\" in value or "\0" in value or (os.altsep and os.altsep in value):
        problem = "it holds a path separator or NUL: a name is one file name, never a path"
    elif not _NAME.fullmatch(value):
        problem = "only letters, digits, space and . - _ + = , ( ) are allowed"
    if problem:
        raise ValueError(f"name: expected a plain file stem (one path component), got {shown(value)}: {problem}")
    return value


def _decode(data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")  # Excel's "Unicode text"
    return data.decode("utf-8-sig", errors="surrogateescape")  # utf-8-sig: Excel's "CSV UTF-8" BOM


def _strict_constant(name):
    raise ValueError(f"{name} is not a number in strict JSON")


def _json_rows(text: str) -> list:
    rows = []
    # split on "\n" only: str.splitlines would also cut at U+2028 or \x85, which JSON strings may hold
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=_strict_constant)
        except Exception as exc:  # ValueError, RecursionError (deep nesting), ...: this line's problem
            first = (str(exc).splitlines() or [""])[0][:200]
            rows.append(_Unreadable(f"line {number}: not JSON ({type(exc).__name__}: {first})"))
            continue
        rows.append(row if isinstance(row, dict) else _Unreadable(f"line {number}: expected a JSON object, got {shown(row)}"))
    return rows


def _csv_rows(text: str) -> list:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise UserError(f"MANIFEST: can't read the CSV header: {exc}") from None
    duplicates = sorted({h for h in header if header.count(h) > 1})
    header_error = f"CSV header: field(s) {', '.join(map(repr, duplicates))} appear more than once" if duplicates else None
    rows = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as exc:  # e.g. a cell over csv's field size limit: that row only
            rows.append(_Unreadable(f"CSV row after line {reader.line_num}: {exc}"))
            continue
        if header_error:
            rows.append(_Unreadable(header_error))
        elif row.get(None):  # DictReader's restkey: cells beyond the header
            rows.append(_Unreadable(f"line {reader.line_num}: {len(header) + len(row[None])} cells, expected at most "
                                    f"{len(header)} (the header's fields)"))
        else:
            rows.append({k: v for k, v in row.items() if k is not None and v not in (None, "")})


def _has_surrogate(value) -> bool:
    if isinstance(value, str):
        return bool(_SURROGATE.search(value))
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return False


def _styles(value, base: str) -> List[str]:
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [p for p in text.split("|") if p.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
        raise ValueError(f"style: expected a path or a list of paths, got {shown(value)}")
    if any("\0" in p for p in value):
        raise ValueError(f"style: expected file paths, got one holding NUL: {shown(value)}")
    return [p if os.path.isabs(p) else os.path.join(base, p) for p in (p.strip() for p in value)]


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}: expected a number >= 0, got {shown(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: a JSON integer too large for a float
        raise ValueError(f"{name}: expected a number >= 0, got {shown(value)}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {shown(value)}")
    return number


def _scale(value):
    """A number, or a non-empty list of numbers (one per block; a JSON list in a CSV cell too).
    Whether the row may have a list is the batch's to say: video rows take one, image rows don't."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"scale: expected a number or a JSON list of numbers, got {shown(value)}") from None
    if isinstance(value, list):
        if not value:
            raise ValueError("scale: expected a number or a non-empty list of numbers (one per block), got []")
        return [_number(f"scale[{i}]", v) for i, v in enumerate(value)]
    return _number("scale", value)


def _finite(name: str, value) -> float:
    """A finite number of either sign (a weight, not a scale)."""
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            pass
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {shown(value)}")
    return number


def _text(name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {shown(value)}")
    return value


def _target(value):
    if isinstance(value, str) and value.strip().startswith("["):
        value = json.loads(value)  # a CSV cell holding a JSON list of module patterns
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return value
    if isinstance(value, dict):  # a block dict, e.g. {"single": {"12": 1.0}}: the registry checks it
        return value
    raise ValueError(f"target: expected a preset name, a list of module patterns or a block dict, got {shown(value)}")


def _fill(job: Job, row: dict, base: str) -> None:
    """The row's fields into ``job``; ValueError for the first bad one (``name`` is checked already)."""
    unknown = sorted(set(row) - set(FIELDS), key=str)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(shown(u) for u in unknown)}; fields are {', '.join(FIELDS)}")
    row = {k: v for k, v in row.items() if v is not None}  # JSON null: the field is absent
    if _has_surrogate(row):
        raise ValueError("expected UTF-8 text, got bytes that are not UTF-8 (save the manifest as UTF-8)")
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise ValueError(f"prompt: expected a non-empty string, got {shown(row.get('prompt'))}")
    job.prompt, job.style = row["prompt"], _styles(row.get("style"), base)
    for key in ("negative_prompt", "content_prompt"):
        if key in row:
            setattr(job, key, _text(key, row[key]))
    if "seed" in row:
        job.seed = parse_seed("seed", row["seed"])
    if "scale" in row:
        job.scale = _scale(row["scale"])
    if "content_scale" in row:
        job.content_scale = _number("content_scale", row["content_scale"])
    if "target" in row:
        job.target = _target(row["target"])
    if "frames" in row:
        from .video import parse_frames

        job.frames = parse_frames("frames", row["frames"])
    _fill_controls(job, row, base)


def _fill_controls(job: Job, row: dict, base: str) -> None:
    """The IP-Adapter controls: names checked against the processors' own lists."""
    job.weight_type = check_control_name("weight_type", row.get("weight_type"), "WEIGHT_TYPES")
    job.embeds_scaling = check_control_name("embeds_scaling", row.get("embeds_scaling"), "EMBEDS_SCALING")
    if "composition_weight" in row:
        job.composition_weight = _finite("composition_weight", row["composition_weight"])
    if "negative_style" in row:
        paths = _styles(row["negative_style"], base)
        if len(paths) != 1:
            raise ValueError(f"negative_style: expected one image path, got {len(paths)}")
        job.negative_style = paths[0]


def _job(index: int, row, base: str) -> Job:
    job = Job(index, str(index))
    if isinstance(row, _Unreadable):
        job.error = f"manifest row {index}: {row}"
        return job
    try:
        if "name" in row and row["name"] is not None:
            try:
                job.name = check_name(row["name"])
            except ValueError:
                job.name, job.writes_files = row_key(index), False  # set before the error: no path from it
                raise
        _fill(job, row, base)
    except Exception as exc:  # whatever a row holds, it fails that row only
        job.error = f"manifest row {index}: {type(exc).__name__ + ': ' if not isinstance(exc, ValueError) else ''}{exc}"
    return job


def _same_file_key(name: str) -> str:
    """Names that are one file on macOS/Windows (case-insensitive, normalising) are one name."""
    return unicodedata.normalize("NFC", name).casefold()


def read_manifest(path: str) -> List[Job]:
    """Every row as a :class:`Job`; bad rows carry ``error``.  Only a missing, unreadable or empty
    file is a :class:`UserError` (before anything runs): everything in a row is that row's error."""
    if not os.path.isfile(path):
        raise UserError(f"MANIFEST: expected a .jsonl or .csv file, got {shown(path)}: no such file")
    try:
        with open(path, "rb") as f:
            text = _decode(f.read())
    except OSError as exc:
        raise UserError(f"MANIFEST: can't read {path}: {exc.strerror or exc}") from None
    rows = _csv_rows(text) if path.lower().endswith(".csv") else _json_rows(text)
    base = os.path.dirname(os.path.abspath(path))
    jobs = [_job(i, row, base) for i, row in enumerate(rows)]
    if not jobs:
        raise UserError(f"MANIFEST: expected at least one row, got none in {path}")
    seen = {}
    for job in jobs:
        if not job.writes_files:
            continue
        key = _same_file_key(job.name)
        if key in seen:  # the later row fails; the first one keeps its name and runs
            first = jobs[seen[key]]
            spelled = f" (as {shown(first.name)})" if first.name != job.name else ""
            job.error = (f"manifest row {job.index}: name: expected a name no other row has, got {shown(job.name)}, "
                         f"which row {first.index} already writes{spelled}")
            job.name, job.writes_files = row_key(job.index), False
        else:
            seen[key] = job.index
    return jobs
