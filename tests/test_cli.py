"""The CLI's one-line errors: an import failure names the module and the file it came from."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from instantstyle.cli import describe_error


def chained(outer: Exception, inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except Exception as exc:  # noqa: BLE001 - returned to be described
        return exc


def test_a_wrapped_import_error_names_the_module_and_its_file():
    inner = ImportError("cannot import name 'CUDAProperties' from 'kernels'", name="kernels", path="/repo/kernels/__init__.py")
    exc = chained(RuntimeError("Failed to import diffusers.loaders.peft because of the following error (look up to see "
                               "its traceback):\ncannot import name ..."), inner)
    line = describe_error(exc)
    assert "\n" not in line and line.startswith("RuntimeError: Failed to import diffusers.loaders.peft: ImportError:")
    assert "'kernels' was imported from /repo/kernels/__init__.py" in line


def test_a_missing_module_says_it_is_not_installed():
    line = describe_error(chained(RuntimeError("Failed to import x"), ModuleNotFoundError("No module named 'zzz'", name="zzz")))
    assert line.endswith("(module 'zzz' is not installed)")


def test_other_errors_stay_one_plain_line():
    assert describe_error(ValueError("bad\nsecond line")) == "ValueError: bad"


@pytest.mark.slow  # a CLI subprocess
def test_a_folder_that_shadows_a_dependency_is_named_by_the_cli(tmp_path):
    (tmp_path / "kernels").mkdir()  # what the repo root used to hold: transformers imports PyPI's `kernels`
    (tmp_path / "kernels" / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "instantstyle", "blocks", "--arch", "sdxl", "--preset", "style"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("instantstyle: error:"), proc.stderr
    assert str(tmp_path / "kernels" / "__init__.py") in lines[0]
