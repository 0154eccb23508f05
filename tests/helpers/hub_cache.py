"""A hub cache on disk, laid out exactly as huggingface_hub writes a download (no network), and a
tiny CLIP image encoder to put in it.  The ``offline_cache`` fixture (tests/conftest.py) points
huggingface_hub at an empty one with HF_HUB_OFFLINE set."""
from __future__ import annotations

import os
import shutil

REV = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache, repo_id: str, files: dict) -> str:
    """``models--owner--name/snapshots/<rev>/...`` + ``refs/main``, as huggingface_hub stores a download.

    ``files`` maps a path in the repo to bytes, a file or a folder; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REV
    for rel, src in files.items():
        dest = snapshot / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
        elif os.path.isdir(src):
            shutil.copytree(src, dest)
        else:
            shutil.copy(src, dest)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    return str(snapshot)


def save_clip_encoder(folder) -> None:
    """A one-layer CLIP vision encoder with a 24-d projection, saved as ``from_pretrained`` reads it."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=24)).save_pretrained(folder)
