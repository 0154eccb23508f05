"""Shared test setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined (the
decorator reads it), i.e. before ``instantstyle.kernels`` is first imported.  With it,
``backend="triton"`` runs the real kernel on CPU tensors through Triton's interpreter;
``backend="auto"`` still picks the torch path on CPU, so other tests stay fast.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(1234)
