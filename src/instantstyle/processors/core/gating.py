"""Step gating: an injection is active only over part of the denoising schedule.

``start_at`` / ``end_at`` are fractions of the schedule, as ComfyUI's IPAdapter nodes
take them: 0 is the first (noisiest) step, 1 the last.  For a discrete-time model with
``T`` training steps, progress ``p`` maps to timestep ``(1 - p) * (T - 1)``, so the
gate is open for ``(1 - end_at) * (T - 1) <= t <= (1 - start_at) * (T - 1)``.

The gate is a *tensor* that the model's one forward pre-hook (``model_state``) rewrites
in place from the ``timestep`` argument, and the pipeline multiplies scales by it.  Nothing branches
on its value in Python, so a ``torch.compile``d UNet never recompiles when the gate
flips, and a CUDA graph that captured the read sees the new value (same storage).

Ramps (as the Flux IP-Adapter node's advanced mode ramps its scale): inside the range
the value goes from ``ramp_from`` at ``start_at`` to ``ramp_to`` at ``end_at``, over the
progress ``r = (p - start_at) / (end_at - start_at)``: ``"linear"`` takes ``r``,
``"ease"`` the smoothstep ``3r^2 - 2r^3`` (zero slope at both ends).  Outside the range
it is 0, as for a plain gate.  Computed with tensor ops from the timestep tensor, on its
device: nothing is read back to the host.
"""
from __future__ import annotations

import torch

from .validation import require_fraction, require_number

RAMPS = (None, "linear", "ease")


class StepGate:
    """Open (1.0) while the current timestep lies in the active range, else 0.0."""

    def __init__(self, start_at: float = 0.0, end_at: float = 1.0, num_train_timesteps: int = 1000, ramp=None,
                 ramp_from: float = 1.0, ramp_to: float = 0.0):
        self.start_at = require_fraction("start_at", start_at)
        self.end_at = require_fraction("end_at", end_at)
        if self.end_at < self.start_at:
            raise ValueError(f"end_at: expected a value >= start_at ({start_at}), got {end_at}")
        if ramp not in RAMPS:
            raise ValueError(f"ramp: expected one of None, 'linear', 'ease', got {ramp!r}")
        self.ramp = ramp
        self.ramp_from = require_number("ramp_from", ramp_from)
        self.ramp_to = require_number("ramp_to", ramp_to)
        self.num_train_timesteps = int(num_train_timesteps)
        self.value = torch.ones((), dtype=torch.float32)

    @property
    def always_open(self) -> bool:
        return self.start_at == 0.0 and self.end_at == 1.0 and self.ramp is None

    def timestep_range(self):
        """``(lowest, highest)`` timestep at which the gate is open."""
        last = self.num_train_timesteps - 1
        return (1.0 - self.end_at) * last, (1.0 - self.start_at) * last

    def update(self, timestep) -> None:
        """Set the gate from the UNet's ``timestep`` argument (number, 0-D or (B,) tensor)."""
        t = torch.as_tensor(timestep).reshape(-1)[0].float()  # pipelines pass one step for the batch
        lo, hi = self.timestep_range()
        is_open = ((t >= lo) & (t <= hi)).float()
        if self.ramp is not None:
            is_open = is_open * self._ramp_value(t)
        if self.value.device != is_open.device:
            self.value = is_open.clone()
        else:
            self.value.copy_(is_open)  # in place: a captured CUDA graph reads this storage

    def _ramp_value(self, t: torch.Tensor) -> torch.Tensor:
        progress = 1.0 - t / max(self.num_train_timesteps - 1, 1)
        span = self.end_at - self.start_at
        r = ((progress - self.start_at) / span).clamp(0.0, 1.0) if span > 0 else torch.zeros_like(t)
        if self.ramp == "ease":
            r = r * r * (3.0 - 2.0 * r)
        return self.ramp_from + (self.ramp_to - self.ramp_from) * r

    def __repr__(self) -> str:
        ramp = f", ramp={self.ramp!r} {self.ramp_from}->{self.ramp_to}" if self.ramp else ""
        return f"StepGate(start_at={self.start_at}, end_at={self.end_at}{ramp})"


def ramp_arguments(ramp) -> dict:
    """``ramp=`` of the loaders: None, ``"linear"``/``"ease"`` (from 1 to 0 over the active
    range) or ``(kind, ramp_from, ramp_to)``; returns StepGate keyword arguments."""
    if ramp is None or isinstance(ramp, str):
        kind, start, end = ramp, 1.0, 0.0
    elif isinstance(ramp, (tuple, list)) and len(ramp) == 3:
        kind, start, end = ramp
    else:
        raise ValueError(f"ramp: expected None, 'linear', 'ease' or (kind, from, to), got {ramp!r}")
    if kind not in RAMPS:
        raise ValueError(f"ramp: expected one of None, 'linear', 'ease', got {kind!r}")
    return {"ramp": kind, "ramp_from": require_number("ramp[1]", start), "ramp_to": require_number("ramp[2]", end)}
