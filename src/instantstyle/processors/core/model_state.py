"""The one state object on a model, its one forward pre-hook, and where contributors
are attached.

- Contributors attached to a layer (editing methods) live on the layer's ``Attention``
  *module*, not on its processor: diffusers re-creates processors by class
  (``unload_ip_adapter``, ``unfuse_qkv_projections``) and copies models
  (``deepcopy``, pickling), and an attachment on the module survives all of that.
  They act only while the module runs an instantstyle processor.
- :class:`ModelState` (``model.__dict__``) holds what every layer shares: the step,
  the timestep and latent size of the current UNet call, and the named contributors
  with the sites they were attached to.  One forward pre-hook updates it, and every
  step gate (IP-Adapters' and methods'), with tensor ops: nothing reads a device value
  on the host, so CUDA graphs and ``torch.compile`` stay possible.
- Nothing here is a second record of the model: :func:`reconcile` compares the state
  with what the layers hold and drops any contributor that lost a layer to a processor
  reset (``set_default_attn_processor``, ``set_attn_processor``, ``unload_ip_adapter``),
  calling its ``on_detach`` so nothing stays half-applied.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .models import attention_modules

_STATE = "_instantstyle_state"
_ATTACHED = "_instantstyle_attached"


def runs_pipeline(processor) -> bool:
    """True for instantstyle's fused processors (they run attached contributors)."""
    return getattr(type(processor), "instantstyle_pipeline", False)


@dataclass
class ModelState:
    step: int = -1  # UNet calls since the current run started
    timestep: Optional[torch.Tensor] = None
    sample_size: Optional[tuple] = None
    text_len: Optional[int] = None  # text tokens of the call (Flux single-stream blocks can't see it)
    last_timestep: Optional[float] = None  # host copy, only where reading it is free
    attached: Dict[str, Tuple[object, List[str]]] = field(default_factory=dict)  # name -> (contributor, sites)
    modules: Dict[str, object] = field(default_factory=dict)  # site -> Attention module (cached)


def state_of(model, create: bool = True) -> Optional[ModelState]:
    state = model.__dict__.get(_STATE)
    if state is None and create:
        state = ModelState(modules=attention_modules(model))
        model.__dict__[_STATE] = state
    if state is not None and create:
        _ensure_hook(model)
    return state


def attached_at(module) -> list:
    """The :class:`~instantstyle.processors.core.contributors.Attached` entries of a layer."""
    return module.__dict__.get(_ATTACHED, ())


def set_attached(module, entries: list) -> None:
    if entries:
        module.__dict__[_ATTACHED] = list(entries)
    else:
        module.__dict__.pop(_ATTACHED, None)


# -- the hook ------------------------------------------------------------------------
def _host_value(timestep, need: bool) -> Optional[float]:
    """The timestep as a float where that costs no device sync (or where ``need``);
    never inside a compiled graph (it would guard on the value)."""
    if torch.compiler.is_compiling():
        return None
    if isinstance(timestep, numbers.Number):
        return float(timestep)
    if isinstance(timestep, torch.Tensor) and timestep.numel() and timestep.device.type != "meta":
        if timestep.device.type == "cpu" or need:
            return float(timestep.reshape(-1)[0])
    return None


def _gates(model, state: ModelState) -> list:
    """Every step gate that can close: those of the IP processors the layers hold, and
    those of the attached contributors."""
    seen, gates = set(), []
    for module in state.modules.values():
        for gate in getattr(module.processor, "gates", ()) or ():
            if gate is not None and id(gate) not in seen:
                seen.add(id(gate))
                gates.append(gate)
    for contributor, _ in state.attached.values():
        gate = getattr(contributor, "gate", None)
        if gate is not None and id(gate) not in seen:
            seen.add(id(gate))
            gates.append(gate)
    return [g for g in gates if not g.always_open]


def _step_hook(model, args, kwargs):
    state = model.__dict__.get(_STATE)
    if state is None:
        return
    reconcile(model)
    gates = _gates(model, state)
    if not gates and not state.attached:
        _remove_hook(model)  # nothing left that needs the step
        del model.__dict__[_STATE]
        return
    sample = kwargs.get("sample", args[0] if args else None)
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    observing = any(5 in getattr(c, "kinds", ()) for c, _ in state.attached.values())
    if not torch.compiler.is_compiling():  # a Python counter would be guarded on: eager bookkeeping only
        now = _host_value(timestep, need=observing)
        # timesteps fall during a run: one that rises starts a new run
        new_run = now is not None and state.last_timestep is not None and now > state.last_timestep
        state.step = 0 if new_run else state.step + 1
        state.last_timestep = now
    state.sample_size = tuple(sample.shape[-2:]) if isinstance(sample, torch.Tensor) and sample.ndim == 4 else None
    text = kwargs.get("encoder_hidden_states")
    state.text_len = text.shape[1] if isinstance(text, torch.Tensor) and text.ndim == 3 else None
    if timestep is not None:
        state.timestep = torch.as_tensor(timestep) if not isinstance(timestep, torch.Tensor) else timestep
        for gate in gates:
            gate.update(timestep)
    for contributor, _ in state.attached.values():
        contributor.on_step(state.step, state.timestep)


def _ensure_hook(model) -> None:
    if not any(hook is _step_hook for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_step_hook, with_kwargs=True)


def _remove_hook(model) -> None:
    # found by identity, not by a stored handle: a deep copy of the model carries the
    # hook in its own hook dict, and a handle would point at the original's
    for key in [k for k, hook in model._forward_pre_hooks.items() if hook is _step_hook]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)


def ensure_step_hook(model) -> None:
    """Have ``model``'s forward update its state and gates (after loading gated adapters)."""
    state_of(model, create=True)


def reset_steps(model) -> None:
    """Restart the step count at 0 for the next UNet call (a new run is also detected
    by itself, from a rising timestep)."""
    state = state_of(model, create=False)
    if state is not None:
        state.step, state.last_timestep = -1, None


# -- contributors by name ----------------------------------------------------------------
def attach(model, name: str, contributor, entries: Dict[str, object]) -> None:
    """Record ``contributor`` under ``name`` and attach ``entries`` ({site: Attached})."""
    state = state_of(model)
    for site, entry in entries.items():
        entry.state = state
        module = state.modules[site]
        set_attached(module, [*attached_at(module), entry])
    state.attached[name] = (contributor, list(entries))


def detach(model, name: str) -> Optional[object]:
    """Take ``name`` off every layer it is attached to; returns the contributor (or None).
    Layers left with nothing attached get back the stateless diffusers processor they
    had, if any (IP-Adapter layers keep the fused processor, and with it their scales)."""
    state = state_of(model, create=False)
    if state is None or name not in state.attached:
        return None
    contributor, sites = state.attached.pop(name)
    for site in sites:
        module = state.modules[site]
        entries = list(attached_at(module))
        mine = [e for e in entries if e.contributor is contributor]
        rest = [e for e in entries if e.contributor is not contributor]
        set_attached(module, rest)
        restore = next((e.restore for e in mine if e.restore is not None), None)
        if not rest and restore is not None and runs_pipeline(module.processor) and not hasattr(module.processor, "to_k_ip"):
            module.set_processor(restore)
    contributor.on_detach(model)
    return contributor


def live(model, name: str) -> bool:
    """Whether every layer of ``name`` still runs it (an instantstyle processor there)."""
    state = state_of(model, create=False)
    if state is None or name not in state.attached:
        return False
    contributor, sites = state.attached[name]
    for site in sites:
        module = state.modules[site]
        if not runs_pipeline(module.processor) or not any(e.contributor is contributor for e in attached_at(module)):
            return False
    return True


def reconcile(model) -> None:
    """Drop (fully) every contributor that lost a layer to a processor reset."""
    state = state_of(model, create=False)
    if state is None:
        return
    for name in [n for n in state.attached if not live(model, n)]:
        warnings.warn(
            f"instantstyle: {name!r} lost layers to a processor reset (e.g. set_attn_processor, "
            "unload_ip_adapter); it has been removed completely. Apply it again to use it.",
            stacklevel=3,
        )
        detach(model, name)


def attached(model) -> Dict[str, object]:
    """``{name: contributor}`` of what is attached (and live) on ``model``."""
    reconcile(model)
    state = state_of(model, create=False)
    return {name: c for name, (c, _) in state.attached.items()} if state else {}


def sites_of(model, name: str) -> List[str]:
    state = state_of(model, create=False)
    return list(state.attached[name][1]) if state and name in state.attached else []
