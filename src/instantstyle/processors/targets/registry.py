"""Which editing method is injected at which attention layer: targets, matching, records.

The registry knows attention *sites* (see ``sites``) and *targets*; it knows nothing
about IP-Adapter.  A method asks it to resolve a target for a kind of site and records
the result under its own name, so StyleAligned, Visual Style Prompting or an
attention-map capture register the same way (``kind="self"`` for the first two).

A target is one of:

- a preset name of the model's architecture (``presets``), e.g. ``"style"``;
- module-path patterns, e.g. ``["up_blocks.0.attentions.1", "mid_block"]`` or
  ``"up_blocks.*.attentions.1"``.  A pattern matches a path *prefix component by
  component*, each component with shell globbing: ``"block"`` never matches
  ``mid_block``, ``"up_blocks.1"`` never matches ``up_blocks.10``;
- a ``set_ip_adapter_scale``-style dict, e.g. ``{"up": {"block_0": [0.0, 1.0, 0.0]}}``,
  expanded by diffusers' own ``_maybe_expand_lora_scales`` (same semantics; missing
  parts are 0).  Its values become per-layer weights; layers at 0 are not targets.
  Transformers (Flux, SD3) take a dict by block list instead (``dit_targets``):
  ``{"transformer_blocks": [w0, w1, ...], "single_transformer_blocks": {12: 1.0}}``
  (aliases ``"double"``/``"single"``/``"joint"``).

Resolution returns ``{site name: weight}`` with only non-zero weights.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..core.model_state import attached_at, reconcile, runs_pipeline
from ..core.validation import describe
from .architectures import DEFAULT_TOKENS, detect_arch, preset_family
from .dit_blocks import resolve_block_dict
from .presets import presets_for
from .sites import AttentionSite, attention_sites

KINDS = ("cross", "self", "any")


def pattern_matches(pattern: str, components) -> bool:
    """Component-wise prefix match with per-component globbing."""
    parts = pattern.split(".")
    if len(parts) > len(components):
        return False
    return all(fnmatch.fnmatchcase(c, p) for p, c in zip(parts, components))


def _nonzero(weight) -> bool:
    if isinstance(weight, (list, tuple)):
        return any(w != 0 for w in weight)
    return weight != 0


def _summary(sites: List[AttentionSite]) -> str:
    """``down_blocks.1.attentions.0 (2 cross, 2 self)``, one line per attention container."""
    groups: Dict[str, Dict[str, int]] = {}
    for s in sites:
        counts = groups.setdefault(s.container, {"cross": 0, "self": 0} if s.kind in ("cross", "self") else {})
        counts[s.kind] = counts.get(s.kind, 0) + 1
    lines = [f"  {name} ({', '.join(f'{n} {kind}' for kind, n in c.items())})" for name, c in groups.items()]
    return "\n".join(lines)


def _default_queries(config, path: str) -> Optional[int]:
    """Query count of a layer at the config's default resolution (DiT: the joint
    sequence, image + text tokens, at 1024 px)."""
    arch = detect_arch(config)
    if arch in DEFAULT_TOKENS:
        return sum(DEFAULT_TOKENS[arch])
    size = config.get("sample_size") if hasattr(config, "get") else None
    n = len(config.get("block_out_channels", ()) or ()) if hasattr(config, "get") else 0
    if not size or not n:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    parts = path.split(".")
    if parts[0] == "down_blocks":
        level = int(parts[1])
    elif parts[0] == "up_blocks":
        level = n - 1 - int(parts[1])
    elif parts[0] == "mid_block":
        level = n - 1
    else:
        return None
    return (h >> level) * (w >> level)


@dataclass
class Injection:
    method: str
    kind: str
    weights: Dict[str, object]  # site name -> weight (non-zero only)
    info: dict = field(default_factory=dict)


class InjectionRegistry:
    """Sites of one UNet, target resolution, and what each method injected where."""

    def __init__(self, unet, arch: Optional[str] = None):
        self.unet = unet
        self.sites = attention_sites(unet)
        self.arch = arch or detect_arch(unet.config)
        self.labels: Dict[str, dict] = {}  # descriptive info per injection name (target, source)

    # -- resolution -------------------------------------------------------------------
    def candidates(self, kind: str) -> List[AttentionSite]:
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "cross":
            return [s for s in self.sites if s.takes_ip]
        if kind == "self":
            return [s for s in self.sites if s.kind == "self" and not s.motion]
        return list(self.sites)

    def presets(self) -> Dict[str, tuple]:
        return presets_for(preset_family(self.arch))

    def _no_match(self, what: str, kind: str) -> ValueError:
        return ValueError(
            f"target: {what} matches no {kind}-attention layer of this {self.arch or 'unknown'} "
            f"{'transformer' if self.arch in DEFAULT_TOKENS else 'UNet'}. "
            f"Its attention modules are:\n{_summary(self.sites)}"
        )

    def resolve(self, target, kind: str = "cross") -> Dict[str, object]:
        """``{site name: weight}`` for ``target`` over the sites of ``kind``."""
        sites = self.candidates(kind)
        if isinstance(target, dict) and self.arch in DEFAULT_TOKENS:
            weights = resolve_block_dict(target, sites, self.arch)
            if not weights:
                raise self._no_match(f"{target!r} (every weight is 0)", kind)
            return weights
        if isinstance(target, dict):
            return self._resolve_dict(target, sites, kind)
        if isinstance(target, str):
            presets = self.presets()
            if target in presets:
                patterns = presets[target]
            elif "." in target or any(ch in target for ch in "*?["):
                patterns = (target,)
            else:
                raise ValueError(
                    f"target: unknown preset {target!r} for architecture {self.arch or 'unknown'}; "
                    f"presets: {', '.join(presets)}. To target modules by path pass a list of patterns, "
                    f"e.g. [{target!r}]"
                )
        elif isinstance(target, (list, tuple)) and target and all(isinstance(p, str) for p in target):
            patterns = tuple(target)
        else:
            raise TypeError(
                "target: expected a preset name, a list of module-path patterns or a "
                f"set_ip_adapter_scale-style dict, got {describe(target)}"
            )
        weights: Dict[str, object] = {}
        for pattern in patterns:
            hits = [s.name for s in sites if pattern_matches(pattern, s.components)]
            if not hits:
                raise self._no_match(f"pattern {pattern!r}", kind)
            weights.update((name, 1.0) for name in hits)
        return {s.name: weights[s.name] for s in sites if s.name in weights}  # site order

    def _resolve_dict(self, target: dict, sites, kind: str) -> Dict[str, object]:
        from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

        unknown = sorted(set(target) - {"down", "mid", "up"})
        if unknown:
            raise ValueError(f"target: expected dict keys among 'down', 'mid', 'up', got {unknown} in {target!r}")
        try:
            expanded = _maybe_expand_lora_scales(self.unet, [target], default_scale=0.0)[0]
        except (ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"target: can't expand {target!r} for this UNet: {exc}") from exc
        weights = {}
        for s in sites:
            for prefix, value in expanded.items():  # keys like "up_blocks.0.attentions.1"
                if pattern_matches(prefix, s.components) and _nonzero(value):
                    weights[s.name] = value
        if not weights:
            raise self._no_match(f"{target!r} (every weight is 0 or outside {kind}-attention)", kind)
        return weights

    # -- records: read from the layers, never stored beside them ----------------------------
    @property
    def injections(self) -> Dict[str, Injection]:
        """What is injected where, read from the layers: each IP-Adapter held by fused
        processors (``ip_adapter[<i>]``, weight = the layer's scale) and each attached
        contributor (``method:<name>``, weight = its target weight there)."""
        reconcile(self.unet)
        found: Dict[str, Injection] = {}
        for s in self.sites:
            proc = getattr(s.module, "processor", None)
            if s.module is None or not runs_pipeline(proc):
                continue
            for a in getattr(proc, "adapter_ids", ()):
                name = f"ip_adapter[{a}]"
                scale = proc.scale[a] if isinstance(proc.scale, (list, tuple)) else proc.scale  # SD3: one float
                found.setdefault(name, Injection(name, "cross", {}, dict(self.labels.get(name, {})))).weights[s.name] = scale
            for entry in attached_at(s.module):
                c = entry.contributor
                name = f"method:{c.name}"
                info = {"target": getattr(c, "target", None), "kinds": c.kinds}
                found.setdefault(name, Injection(name, getattr(c, "kind", "any"), {}, info)).weights[s.name] = entry.weight
        return found

    def table(self, planned: Optional[Dict[str, dict]] = None) -> List[dict]:
        """One row per site: name, kind, heads, head_dim, queries, injected.  ``planned``
        (``{name: {site: weight}}``, e.g. a resolved target) is shown as injected too,
        which lets ``instantstyle blocks`` describe a model nothing was loaded into."""
        records = {**{n: i.weights for n, i in self.injections.items()}, **(planned or {})}
        rows = []
        for s in self.sites:
            rows.append(
                {
                    "name": s.name,
                    "kind": s.kind,
                    "heads": s.heads,
                    "head_dim": s.head_dim,
                    "queries": _default_queries(self.unet.config, s.path),
                    "motion": s.motion,
                    "injected": [m for m, weights in records.items() if s.name in weights],
                }
            )
        return rows


def registry_of(unet, arch: Optional[str] = None) -> InjectionRegistry:
    """The registry attached to ``unet`` (created on first use)."""
    reg = unet.__dict__.get("_instantstyle_registry")
    if reg is None or (arch is not None and reg.arch != arch):
        reg = InjectionRegistry(unet, arch)
        unet.__dict__["_instantstyle_registry"] = reg
    return reg
