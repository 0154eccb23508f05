"""The repo root can't shadow anything: commands run there exactly as a user runs them
(``python -m instantstyle``, a Python shell), with the installed package and its
dependencies, never a folder of this checkout."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.stylize import stylize_args

ROOT = Path(__file__).resolve().parents[2]


def run_at_root(*args, **env):
    """``python *args`` with the repo root as the working directory (so on ``sys.path``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def top_level_names(root: Path) -> set:
    """Import names the repo root would offer to ``import``: folders and ``.py`` modules."""
    return {p.stem if p.suffix == ".py" else p.name for p in root.iterdir()
            if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".py")}


def test_no_top_level_name_is_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in top_level_names(ROOT) if name in installed}
    assert not clashes, f"top-level names of the repo that shadow installed distributions: {clashes}"


def test_the_check_can_fail(tmp_path):
    (tmp_path / "kernels").mkdir()  # the folder that once hid the PyPI 'kernels' transformers imports
    (tmp_path / "numpy.py").write_text("")
    clashes = top_level_names(tmp_path) & set(importlib.metadata.packages_distributions())
    assert clashes == {"kernels", "numpy"}  # both installed: transformers requires 'kernels', torch 'numpy'



@pytest.mark.slow  # a python subprocess importing transformers
def test_a_python_shell_at_the_root_imports_the_installed_packages():
    proc = run_at_root("-c", "import transformers.modeling_utils, instantstyle.kernels, instantstyle; "
                             "print(instantstyle.kernels.__file__); print(instantstyle.__file__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in proc.stdout.split():
        assert "site-packages" in line or "/src/instantstyle/" in line, line  # installed, or this checkout's src/ when editable


@pytest.mark.slow  # a whole pipeline run in a subprocess
def test_python_m_instantstyle_stylize_at_the_root_loads_a_tiny_pipeline(tiny_sdxl, tmp_path):
    out = tmp_path / "root.png"
    proc = run_at_root("-m", "instantstyle", *stylize_args(tiny_sdxl, out, "--steps", "1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and json.loads((tmp_path / "root.png.json").read_text())["targets"]
