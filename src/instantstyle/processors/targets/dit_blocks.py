"""``set_ip_adapter_scale``-style dict targets for transformers (Flux, SD3).

diffusers' UNet dicts name ``down``/``mid``/``up`` parts, which a DiT doesn't have; its
Flux ``set_ip_adapter_scale`` takes one scale per double-stream block instead.  A DiT
dict therefore names block *lists* and gives per-block weights::

    {"transformer_blocks": [0.0, 1.0, ...]}            # one weight per block (all of them)
    {"single_transformer_blocks": {10: 1.0, 11: 0.5}}  # by block index, missing = 0
    {"double": 1.0}                                    # one weight for the whole list

Aliases: ``double`` and ``joint`` = ``transformer_blocks``, ``single`` =
``single_transformer_blocks``.  Lists not named get weight 0 (as diffusers' dicts).
"""
from __future__ import annotations

import numbers
from typing import Dict

from ..core.validation import describe

ALIASES = {"double": "transformer_blocks", "joint": "transformer_blocks", "single": "single_transformer_blocks"}


def _block_of(site) -> tuple:
    """``("transformer_blocks", 3)`` for ``transformer_blocks.3.attn.processor``."""
    parts = site.components
    return parts[0], int(parts[1])


def resolve_block_dict(target: dict, sites, arch: str) -> Dict[str, object]:
    """``{site name: weight}`` (non-zero only) for a DiT dict target over ``sites``."""
    counts: Dict[str, int] = {}
    for s in sites:
        group, index = _block_of(s)
        counts[group] = max(counts.get(group, 0), index + 1)
    per_block: Dict[tuple, float] = {}
    for key, value in target.items():
        group = ALIASES.get(key, key)
        if group not in counts:
            names = sorted(set(counts) | {a for a, g in ALIASES.items() if g in counts})
            raise ValueError(f"target: expected dict keys among {', '.join(names)} for {arch}, got {key!r}")
        n = counts[group]
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            items = {i: float(value) for i in range(n)}
        elif isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"target[{key!r}]: expected {n} weights (one per block), got {len(value)}")
            items = dict(enumerate(value))
        elif isinstance(value, dict):
            bad = [i for i in value if not isinstance(i, int) or not 0 <= i < n]
            if bad:
                raise ValueError(f"target[{key!r}]: expected block indices in [0, {n}), got {bad}")
            items = dict(value)
        else:
            raise TypeError(f"target[{key!r}]: expected a number, a list of {n} numbers or {{index: weight}}, got {describe(value)}")
        for i, w in items.items():
            if not isinstance(w, numbers.Number) or isinstance(w, bool):
                raise TypeError(f"target[{key!r}][{i}]: expected a number, got {describe(w)}")
            per_block[(group, i)] = float(w)
    return {s.name: per_block[_block_of(s)] for s in sites if per_block.get(_block_of(s), 0.0) != 0}
