"""What every loader reports, and the argument rules every loader shares."""
from __future__ import annotations

from ..processors.core.validation import require_scale


class SavingsReport:
    """Mixin for a load report with ``ip_params`` (held), ``ip_params_all_layers`` (what
    loading every capable layer would hold) and ``bytes_per_param``."""

    @property
    def params_saved(self) -> int:
        return self.ip_params_all_layers - self.ip_params

    @property
    def bytes_saved(self) -> int:
        return self.params_saved * self.bytes_per_param

    def savings_line(self) -> str:
        return (f"IP parameters: {self.ip_params:,} held of {self.ip_params_all_layers:,} "
                f"({self.params_saved:,} / {self.bytes_saved / 2**20:.1f} MiB saved)")


def per_adapter(name: str, value, n: int) -> list:
    """With several checkpoints a list gives one entry per checkpoint; anything else is shared."""
    if n > 1 and isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected one entry per checkpoint ({n}) or one value for all, got {len(value)}")
        return list(value)
    return [value] * n


def adapter_arguments(n: int, target, scale, start_at, end_at) -> tuple:
    """``(targets, scales, starts, ends)``: one entry per checkpoint each, scales checked."""
    scales = [require_scale(f"scale[{i}]" if n > 1 else "scale", s) for i, s in enumerate(per_adapter("scale", scale, n))]
    return per_adapter("target", target, n), scales, per_adapter("start_at", start_at, n), per_adapter("end_at", end_at, n)


def scaled_weight(scale, weight):
    """Adapter scale times layer weight; either may be a per-image list, not both."""
    if isinstance(scale, list) and isinstance(weight, list):
        raise ValueError(f"scale: a per-image scale list {scale} can't combine with per-image target weights {weight}")
    if isinstance(scale, list):
        return [s * weight for s in scale]
    if isinstance(weight, list):
        return [scale * w for w in weight]
    return scale * weight


def check_caches_argument(caches) -> None:
    if caches is not None and not isinstance(caches, bool):
        raise TypeError(f"caches: expected None, True or False, got {type(caches).__name__}")
