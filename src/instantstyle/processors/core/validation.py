"""Argument checks shared by the processors package: errors name the argument, what
was expected and what was received."""
from __future__ import annotations

import numbers
from typing import Any


def describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 80 else text[:77] + '...'}"


def require_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {describe(value)}")
    return float(value)


def require_fraction(name: str, value) -> float:
    value = require_number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a fraction of the schedule in [0, 1], got {value}")
    return value


def require_scale(name: str, value):
    """A scale: a number, or a list of numbers (one per masked image)."""
    if isinstance(value, (list, tuple)):
        return [require_number(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return require_number(name, value)
