"""Shared test setup and suite-wide fixtures.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined (the
decorator reads it), i.e. before ``instantstyle.kernels`` is first imported.  With it,
``backend="triton"`` runs the real kernel on CPU tensors through Triton's interpreter;
``backend="auto"`` still picks the torch path on CPU, so other tests stay fast.

Markers (pytest.ini): ``gpu`` tests need a CUDA GPU and are skipped here without one;
``slow`` tests are left out of the quick loop, ``python -m pytest -m "not slow"``.
Shared builders live in ``tests/helpers/`` (``from helpers.<module> import ...``).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    no_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if no_gpu is not None and "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(1234)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub reads, offline (fill it with
    ``helpers.hub_cache.make_hub_cache``)."""
    import huggingface_hub.constants as C

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    return cache
