"""Every ```python block of README.md runs, top to bottom in one namespace like a notebook, on CPU.

The README is executed as written; the harness only supplies stand-ins for what a reader
has and CI lacks: a local hub cache (HF_HUB_OFFLINE=1) holding a tiny SDXL pipeline as
``stabilityai/stable-diffusion-xl-base-1.0`` and a tiny IP-Adapter + image encoder as
``h94/IP-Adapter``, the files the examples name in the working directory, and
``"cuda"``/float16 -> CPU/float32.  A block that fails fails this test
with the block's README line and the error.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.sdxl_pipelines import build_tiny_sdxl

pytestmark = pytest.mark.slow  # every README block on a tiny SDXL pipeline, in a subprocess

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
REV = "0" * 40

#: harness-side substitutions: the README stays as a reader runs it on a GPU
SUBSTITUTIONS = [('"cuda"', '"cpu"'), ("torch.float16", "torch.float32")]
PRELUDE = ""  # the README defines every name it uses

RUNNER = r'''
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__readme__"}
exec(compile(blocks[0]["code"], "<prelude>", "exec"), namespace)
results = []
for block in blocks[1:]:
    try:
        exec(compile(block["code"], f"README.md:{block['line']}", "exec"), namespace)
        results.append({"line": block["line"], "ok": True})
    except BaseException:
        results.append({"line": block["line"], "ok": False, "error": traceback.format_exc(limit=-4)})
print("RESULTS " + json.dumps(results))
'''


def python_blocks(text: str):
    """``(line, code)`` of every fenced ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        out.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return out


def _hub(cache: Path, repo_id: str, files: dict) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for rel, src in files.items():
        dest = repo / "snapshots" / REV / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)


def _tiny_models(tmp: Path) -> Path:
    root = tmp / "tiny"
    root.mkdir()
    return build_tiny_sdxl(root)


def test_every_python_block_of_the_readme_runs(tmp_path):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 5, "the README lost its examples?"
    tiny = _tiny_models(tmp_path)
    cache, work = tmp_path / "hub", tmp_path / "work"
    _hub(cache, "stabilityai/stable-diffusion-xl-base-1.0", {"": tiny / "model"})
    _hub(cache, "h94/IP-Adapter", {"sdxl_models/ip-adapter_sdxl.safetensors": tiny / "ip-adapter.safetensors",
                                   "sdxl_models/image_encoder": tiny / "image_encoder"})
    (work / "sdxl_models").mkdir(parents=True)
    shutil.copy(tiny / "ip-adapter.safetensors", work / "sdxl_models" / "ip-adapter_sdxl.safetensors")
    shutil.copytree(tiny / "image_encoder", work / "sdxl_models" / "image_encoder")
    shutil.copy(tiny / "ip-adapter.safetensors", work / "ip-adapter_sdxl.safetensors")
    shutil.copy(tiny / "style.png", work / "reference.png")
    shutil.copy(tiny / "style2.png", work / "other_reference.png")

    code = []
    for line, block in blocks:
        for old, new in SUBSTITUTIONS:
            block = block.replace(old, new)
        code.append({"line": line, "code": block})
    (work / "blocks.json").write_text(json.dumps([{"line": 0, "code": PRELUDE}] + code))
    (work / "runner.py").write_text(RUNNER)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "runner.py", "blocks.json"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert marker, proc.stderr[-3000:]
    results = json.loads(marker[-1][len("RESULTS "):])
    assert len(results) == len(blocks)
    by_line = dict(blocks)
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(f"README.md:{r['line']}:\n{r['error']}\n{by_line[r['line']][:200]}" for r in failed)
