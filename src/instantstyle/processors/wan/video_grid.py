"""The latent token grid of a Wan-family forward: ``N = F' * H' * W'`` query tokens, frame
major, from the ``hidden_states`` ``(B, C, F, H, W)`` the model is called with and its
``patch_size`` (Wan: ``(1, 2, 2)``), as diffusers' ``WanRotaryPosEmbed`` lays them out.

Methods that need it (per-frame attention maps, a first-frame reference) register a
:class:`GridHook` on the model while attached; the model's shared step state knows only
a UNet's 4-D latent size, and a video needs the frame count too."""
from __future__ import annotations

import torch


def latent_grid(model, hidden_states) -> tuple[int, int, int] | None:
    """``(F', H', W')`` of a call with ``hidden_states`` (None if not a 5-D tensor)."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
        return None
    p_t, p_h, p_w = model.config.patch_size
    _, _, f, h, w = hidden_states.shape
    return f // p_t, h // p_h, w // p_w


class GridHook:
    """A forward pre-hook writing each call's grid to ``owner.grid``."""

    def __init__(self, owner):
        self.owner = owner

    def __call__(self, model, args, kwargs):
        self.owner.grid = latent_grid(model, kwargs.get("hidden_states", args[0] if args else None))


def track_grid(model, owner) -> None:
    """Have every forward of ``model`` record its grid on ``owner`` (once per owner)."""
    if not any(isinstance(h, GridHook) and h.owner is owner for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(GridHook(owner), with_kwargs=True)


def untrack_grid(model, owner) -> None:
    # found by owner, not by a stored handle: a deep copy of the model carries its own hooks
    for key in [k for k, h in model._forward_pre_hooks.items() if isinstance(h, GridHook) and h.owner is owner]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)
