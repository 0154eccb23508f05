"""Training data: image-caption pairs, read once, checked once, loaded per sample.

Two layouts:

* a JSONL file, one object per line: ``{"image": "imgs/0001.jpg", "text": "a red bus"}``
  (image paths relative to the file's folder);
* a folder of images (``.png .jpg .jpeg .webp .bmp``), each with a caption in a text file of
  the same name (``0001.jpg`` + ``0001.txt``), read in sorted name order.

Every row is checked when the data set is read (the line parses, ``image`` and ``text`` are
strings, the image opens and verifies): a bad row is skipped and counted, and
:attr:`Dataset.warning` names the first few in one line.  A bad row never stops a run.

Each sample is resized on its short side to the training resolution and center-cropped;
SDXL's micro-conditioning (original size, crop top-left, target size) comes with it.  The
order over epochs is a permutation drawn from ``(seed, epoch)``, so global sample ``g`` is
the same image for any number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: rows named in the one-line warning; the rest are counted
NAMED_BAD_ROWS = 3


@dataclass(frozen=True)
class Row:
    index: int  # position among the good rows
    image: str
    text: str
    where: str  # "data.jsonl line 4" / "0001.jpg": how messages name it


@dataclass
class Dataset:
    rows: list[Row]
    source: str
    bad: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def warning(self) -> str | None:
        """One line naming the bad rows that were skipped, or None."""
        if not self.bad:
            return None
        named = "; ".join(f"{where}: {why}" for where, why in self.bad[:NAMED_BAD_ROWS])
        more = f"; and {len(self.bad) - NAMED_BAD_ROWS} more" if len(self.bad) > NAMED_BAD_ROWS else ""
        return (f"data: skipped {len(self.bad)} bad row(s) of {len(self.bad) + len(self.rows)} in {self.source} "
                f"({named}{more})")


def _check_image(path: str) -> str | None:
    """None for an image PIL can open and verify, else why not."""
    from PIL import Image

    if not os.path.isfile(path):
        return f"image not found: {path!r}"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # any decoder error: the row is bad, the run goes on
        return f"image unreadable: {path!r} ({type(exc).__name__})"
    return None


def _jsonl_rows(path: str):
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{os.path.basename(path)} line {number}"
            try:
                record = json.loads(line)
            except ValueError:
                yield where, None, None, "not JSON"
                continue
            if not isinstance(record, dict):
                yield where, None, None, "expected an object {\"image\": ..., \"text\": ...}"
                continue
            image, text = record.get("image"), record.get("text")
            if not isinstance(image, str) or not image:
                yield where, None, None, "'image': expected a path"
                continue
            if not isinstance(text, str):
                yield where, None, None, "'text': expected a string"
                continue
            yield where, os.path.join(root, os.path.expanduser(image)), text, None


def _folder_rows(folder: str):
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        caption = os.path.join(folder, stem + ".txt")
        try:
            with open(caption, encoding="utf-8-sig") as f:
                text = f.read().strip()
        except OSError:
            yield name, None, None, f"no caption file {stem + '.txt'!r}"
            continue
        except UnicodeDecodeError:
            yield name, None, None, f"caption {stem + '.txt'!r} is not UTF-8"
            continue
        yield name, os.path.join(folder, name), text, None


def read_dataset(path: str) -> Dataset:
    """Read and check every row; raises ValueError only when ``path`` is not a data set at all."""
    if os.path.isdir(path):
        found = _folder_rows(path)
    elif os.path.isfile(path):
        found = _jsonl_rows(path)
    else:
        raise ValueError(f"no such file or folder: {path!r}")
    rows, bad = [], []
    for where, image, text, why in found:
        why = why or _check_image(image)
        if why is not None:
            bad.append((where, why))
        else:
            rows.append(Row(len(rows), image, text, where))
    return Dataset(rows, path, bad)


# -- order ---------------------------------------------------------------------------------
def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (sha256: no correlation between neighbouring inputs)."""
    digest = hashlib.sha256(b"".join(int(p).to_bytes(16, "little", signed=True) for p in parts)).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_seed(seed: int, global_index: int) -> int:
    """The seed of global sample ``global_index``: its noise, timestep, drops, VAE sample."""
    return _mix(seed, 1, global_index)


class Order:
    """Global sample index -> row, epoch by epoch, a fresh permutation per epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._epoch, self._perm = None, None

    def row(self, global_index: int) -> int:
        epoch, position = divmod(global_index, self.size)
        if not self.shuffle:
            return position
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng(_mix(self.seed, 2, epoch)).permutation(self.size)
        return int(self._perm[position])


# -- one sample ------------------------------------------------------------------------------
def resize_and_crop(image, resolution: int):
    """Short side to ``resolution`` (bicubic), then a center crop to a square.

    Returns ``(image, original (h, w), crop top-left (top, left))``, the crop coordinates in
    the resized image as SDXL's micro-conditioning expects them."""
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    return resized.crop((left, top, left + resolution, top + resolution)), (height, width), (top, left)


@dataclass
class Sample:
    global_index: int
    row: Row
    pixels: torch.Tensor  # [3, R, R] in [-1, 1]
    time_ids: torch.Tensor  # [6]: original h, w, crop top, left, target h, w
    clip_image: object  # the PIL image the image encoder's processor sees


def load_sample(row: Row, global_index: int, resolution: int) -> Sample:
    from PIL import Image

    with Image.open(row.image) as opened:
        image = opened.convert("RGB")
    cropped, (h, w), (top, left) = resize_and_crop(image, resolution)
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    time_ids = torch.tensor([h, w, top, left, resolution, resolution], dtype=torch.float32)
    return Sample(global_index, row, pixels, time_ids, image)


class Loader:
    """Samples by global index.  A row that verified when read but fails to decode now (a file
    changed under the run) is replaced by the next good row, deterministically, and reported
    once through ``warn``."""

    def __init__(self, dataset: Dataset, resolution: int, seed: int, warn=print):
        self.dataset, self.resolution, self.warn = dataset, resolution, warn
        self.order = Order(len(dataset), seed)
        self.failed = set()

    def __call__(self, global_index: int) -> Sample:
        index = self.order.row(global_index)
        for attempt in range(len(self.dataset)):
            row = self.dataset.rows[(index + attempt) % len(self.dataset)]
            if row.index in self.failed:
                continue
            try:
                return load_sample(row, global_index, self.resolution)
            except Exception as exc:  # noqa: BLE001 - a bad file never ends a run
                self.failed.add(row.index)
                self.warn(f"data: {row.where}: image unreadable now ({type(exc).__name__}); the next row stands in")
        raise RuntimeError("data: no readable image left")
