"""Step gating: an injection is active only over part of the denoising schedule.

``start_at`` / ``end_at`` are fractions of the schedule, as ComfyUI's IPAdapter nodes
take them: 0 is the first (noisiest) step, 1 the last.  For a discrete-time model with
``T`` training steps, progress ``p`` maps to timestep ``(1 - p) * (T - 1)``, so the
gate is open for ``(1 - end_at) * (T - 1) <= t <= (1 - start_at) * (T - 1)``.

The gate is a *tensor* that the model's one forward pre-hook (``model_state``) rewrites
in place from the ``timestep`` argument, and the pipeline multiplies scales by it.  Nothing branches
on its value in Python, so a ``torch.compile``d UNet never recompiles when the gate
flips, and a CUDA graph that captured the read sees the new value (same storage).
"""
from __future__ import annotations

import torch

from .validation import require_fraction


class StepGate:
    """Open (1.0) while the current timestep lies in the active range, else 0.0."""

    def __init__(self, start_at: float = 0.0, end_at: float = 1.0, num_train_timesteps: int = 1000):
        self.start_at = require_fraction("start_at", start_at)
        self.end_at = require_fraction("end_at", end_at)
        if self.end_at < self.start_at:
            raise ValueError(f"end_at: expected a value >= start_at ({start_at}), got {end_at}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.value = torch.ones((), dtype=torch.float32)

    @property
    def always_open(self) -> bool:
        return self.start_at == 0.0 and self.end_at == 1.0

    def timestep_range(self):
        """``(lowest, highest)`` timestep at which the gate is open."""
        last = self.num_train_timesteps - 1
        return (1.0 - self.end_at) * last, (1.0 - self.start_at) * last

    def update(self, timestep) -> None:
        """Set the gate from the UNet's ``timestep`` argument (number, 0-D or (B,) tensor)."""
        t = torch.as_tensor(timestep).reshape(-1)[0].float()  # pipelines pass one step for the batch
        lo, hi = self.timestep_range()
        is_open = ((t >= lo) & (t <= hi)).float()
        if self.value.device != is_open.device:
            self.value = is_open.clone()
        else:
            self.value.copy_(is_open)  # in place: a captured CUDA graph reads this storage

    def __repr__(self) -> str:
        return f"StepGate(start_at={self.start_at}, end_at={self.end_at})"
