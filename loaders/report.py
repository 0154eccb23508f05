"""What every loader reports, and the argument rule every loader shares."""
from __future__ import annotations


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
