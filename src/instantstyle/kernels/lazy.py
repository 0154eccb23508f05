"""Lazy re-exports: a package names its public API up front but imports a submodule only
when one of its names is first used (most pull in diffusers, which takes seconds; the CLI
and ``import instantstyle`` should not pay for that)."""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict):
    """``(__getattr__, __dir__)`` for ``package``; ``exports`` maps name -> module (relative ok)."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value  # resolve once
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
