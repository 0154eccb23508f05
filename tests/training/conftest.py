"""A saved tiny SDXL pipeline with an image encoder, and a tiny data set written here:
six image-caption pairs in a JSONL file plus three bad rows (not JSON, a missing image, a
file that is not an image), and the same pairs as a folder with .txt captions."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from helpers.sdxl_pipelines import build_tiny_sdxl

RESOLUTION = 32  # the tiny VAE downsamples by 2: 16x16 latents, the tiny UNet's sample size


def write_pairs(folder, n: int = 6) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        # different shapes, so crops and micro-conditioning differ per row
        Image.fromarray(rng.integers(0, 255, (36 + 6 * i, 48 - 2 * i, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a picture number {i}\n")
        rows.append({"image": f"{i:02d}.png", "text": f"a picture number {i}"})
    return rows


@pytest.fixture(scope="session")
def train_root(tmp_path_factory):
    """``root/model``, ``root/image_encoder``, ``root/style.png``, ``root/data/pairs.jsonl``
    (6 good rows, 3 bad) and ``root/folder`` (the 6 pairs as images + captions)."""
    root = build_tiny_sdxl(tmp_path_factory.mktemp("tiny-train"))
    rows = write_pairs(root / "data")
    write_pairs(root / "folder")
    (root / "data" / "broken.png").write_bytes(b"not a png")
    lines = [json.dumps(r) for r in rows[:3]] + ["{not json", json.dumps({"image": "missing.png", "text": "x"}),
                                                 json.dumps({"image": "broken.png", "text": "y"})]
    lines += [json.dumps(r) for r in rows[3:]]
    (root / "data" / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root
