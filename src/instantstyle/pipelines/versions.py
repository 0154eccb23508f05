"""Installed versions of what instantstyle uses, for sidecars and summaries.

Lives here (not in the CLI's ``info``) because pipelines must not import the CLI package.
"""
from __future__ import annotations

import importlib
import platform

PACKAGES = ("torch", "triton", "diffusers", "transformers", "safetensors", "numpy", "xformers", "accelerate")


def package_versions() -> dict:
    """``{name: version}``; optional extras say 'absent', a broken build says so."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    try:
        versions["instantstyle"] = version("instantstyle")
    except PackageNotFoundError:
        versions["instantstyle"] = "not installed"
    for name in PACKAGES:
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as exc:  # ImportError, or a broken build (xformers vs a mismatched torch)
            versions[name] = "absent" if isinstance(exc, ImportError) else f"broken ({type(exc).__name__})"
    return versions
