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
- The hook also scopes the per-run caches (``step_cache``): it decides whether a call
  continues the current denoising run (:func:`same_run`) and makes the model's run
  active while the model runs (a post-forward hook, called even when forward raises,
  ends it).  :func:`set_caches` turns caching on or off per model, :func:`clear_caches`
  starts a new run and empties every cache of the model.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from . import step_cache
from .contributors import Kind
from .models import attention_modules, unet_of
from .step_cache import Run

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
    caches: Optional[bool] = None  # set_caches: True on, False off, None never set (off; no hook needed)
    run: Run = field(default_factory=Run)  # the denoising run the caches belong to
    run_mark: object = None  # where the last call's timestep sat (same_run)
    #: the model is called once per CFG half at every step (Wan-family pipelines), so a call at
    #: the timestep of the previous one continues its run instead of starting a new one
    calls_per_cfg_half: bool = False


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


def run_mark(timestep, now: Optional[float]):
    """Where a call's timestep sits in its schedule, read without a device sync: its value
    where that is free (``now``: a number or a CPU tensor), else, for a view of a
    schedule tensor on the device (a pipeline's ``t`` from ``scheduler.timesteps``, or
    ``t.expand(...)``), that tensor and the offset into it; None when neither is known."""
    if now is not None:
        return now
    if isinstance(timestep, torch.Tensor) and timestep._base is not None:
        return timestep._base, timestep.storage_offset()
    return None


def same_run(previous, mark, same_step: bool = False) -> bool:
    """Whether a call at ``mark`` continues the run of the call at ``previous``: its
    timestep strictly falls (a later entry of the same schedule tensor, where the value
    can't be read for free).  The same or a rising timestep starts a new run, so a
    direct call repeated with the same inputs never reads caches of the previous one;
    unknown timesteps too (a missed continuation only costs the reuse).  ``same_step``:
    the same timestep continues too (models called once per CFG half, see
    :attr:`ModelState.calls_per_cfg_half`)."""
    if previous is None or mark is None:
        return False
    if isinstance(mark, float):
        return isinstance(previous, float) and (mark < previous or (same_step and mark == previous))
    # ``previous`` holds its schedule tensor, so a new tensor can't take its identity
    return isinstance(previous, tuple) and mark[0] is previous[0] and (
        mark[1] > previous[1] or (same_step and mark[1] == previous[1]))


def _track_run(state: ModelState, timestep, now: Optional[float]) -> None:
    mark = run_mark(timestep, now)
    if not same_run(state.run_mark, mark, state.calls_per_cfg_half):
        state.run = Run()
    state.run_mark = mark


def _cache_run(state: ModelState):
    """The run this call's caches read and fill: none where caching is off."""
    if not state.caches:  # off, or never turned on
        return None if state.caches is False else step_cache.pinned_run()
    return step_cache.pinned_run() or state.run


def _runs_ours(state: ModelState) -> bool:
    """Whether any layer still runs one of our processors (after ``unload_ip_adapter`` or
    ``set_default_attn_processor`` none does, and the per-run caches have nothing to serve)."""
    return any(runs_pipeline(getattr(m, "processor", None)) for m in state.modules.values())


def _step_hook(model, args, kwargs):
    state = model.__dict__.get(_STATE)
    if state is None:
        return
    reconcile(model)
    gates = _gates(model, state)
    if not gates and not state.attached and (state.caches is None or not _runs_ours(state)):
        _remove_hook(model)  # nothing left that needs the step (caches live on our processors only)
        del model.__dict__[_STATE]
        return
    sample = kwargs.get("sample", args[0] if args else None)
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    observing = any(Kind.OBSERVE in getattr(c, "kinds", ()) for c, _ in state.attached.values())
    eager = not torch.compiler.is_compiling()
    if eager:  # a Python counter would be guarded on: eager bookkeeping only
        now = _host_value(timestep, need=observing)
        # timesteps fall during a run: one that rises starts a new run
        new_run = now is not None and state.last_timestep is not None and now > state.last_timestep
        state.step = 0 if new_run else state.step + 1
        state.last_timestep = now
        _track_run(state, timestep, now)
    state.sample_size = tuple(sample.shape[-2:]) if isinstance(sample, torch.Tensor) and sample.ndim == 4 else None
    text = kwargs.get("encoder_hidden_states")
    state.text_len = text.shape[1] if isinstance(text, torch.Tensor) and text.ndim == 3 else None
    if timestep is not None:
        state.timestep = torch.as_tensor(timestep) if not isinstance(timestep, torch.Tensor) else timestep
        for gate in gates:
            gate.update(timestep)
    for contributor, _ in state.attached.values():
        contributor.on_step(state.step, state.timestep)
    if eager:  # last: nothing after it can raise before forward (whose end _end_hook is)
        step_cache.enter(id(model), _cache_run(state))


def _end_hook(model, args, kwargs, output):
    if not torch.compiler.is_compiling():
        step_cache.leave(id(model))


def _ensure_hook(model) -> None:
    if not any(hook is _step_hook for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_step_hook, with_kwargs=True)
    if not any(hook is _end_hook for hook in model._forward_hooks.values()):
        # always_call: the run is ended even when forward raises
        model.register_forward_hook(_end_hook, with_kwargs=True, always_call=True)


def _remove_hook(model) -> None:
    # found by identity, not by a stored handle: a deep copy of the model carries the
    # hook in its own hook dict, and a handle would point at the original's
    for key in [k for k, hook in model._forward_pre_hooks.items() if hook is _step_hook]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    for key in [k for k, hook in model._forward_hooks.items() if hook is _end_hook]:
        del model._forward_hooks[key]
        model._forward_hooks_with_kwargs.pop(key, None)
        model._forward_hooks_always_called.pop(key, None)


def ensure_step_hook(model) -> None:
    """Have ``model``'s forward update its state and gates (after loading gated adapters)."""
    state_of(model, create=True)


def reset_steps(model) -> None:
    """Restart the step count at 0 for the next UNet call (a new run is also detected
    by itself, from a rising timestep); the next call also starts a new cache run."""
    state = state_of(model, create=False)
    if state is not None:
        state.step, state.last_timestep = -1, None
        state.run, state.run_mark = Run(), None


# -- per-run caches ----------------------------------------------------------------------
def clear_caches(model_or_pipeline) -> None:
    """Empty every per-run cache of a model (or a pipeline's denoiser) and start a new
    run.  Needed after an edit through ``.data`` or a numpy view *inside* a run (e.g. in
    ``callback_on_step_end``): no cheap check sees those (``step_cache``).  Between runs,
    and for autograd-visible edits (in-place ops, ``copy_``, ``load_state_dict``),
    nothing is needed."""
    model = unet_of(model_or_pipeline)
    for module in model.modules():
        step_cache.clear_owned(module)
    state = state_of(model, create=False)
    if state is not None:
        state.run, state.run_mark = Run(), None


def set_caches(model_or_pipeline, enabled: bool = True) -> None:
    """Turn the per-run caches of a model (or a pipeline's denoiser) on or off.

    On, the image projection and each layer's text and IP key/value projections are
    computed once per denoising run while their inputs are unchanged; off, every call
    computes everything (as diffusers does).  Either way the caches are emptied.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected True or False, got {type(enabled).__name__}")
    model = unet_of(model_or_pipeline)
    state_of(model, create=True).caches = enabled
    clear_caches(model)


def default_caches(model_or_pipeline) -> None:
    """Turn the caches on unless ``set_caches(model, False)`` turned them off (for the
    loaders and converters: loading again keeps a user's choice)."""
    model = unet_of(model_or_pipeline)
    state = state_of(model, create=True)
    if state.caches is None:
        state.caches = True


def call_per_cfg_half(model_or_pipeline) -> None:
    """Mark a model its pipelines call once per CFG half at each step (cond, then uncond at
    the same timestep, as diffusers' Wan pipelines do): those calls are one run, so the
    per-run caches serve both halves at every step.  A direct call repeated at one timestep
    then continues the run too; the caches' exact checks still decide every reuse."""
    state_of(unet_of(model_or_pipeline), create=True).calls_per_cfg_half = True


def choose_caches(model_or_pipeline, caches: Optional[bool]) -> None:
    """A loader's ``caches`` argument: None keeps the user's choice (on by default), a bool sets it."""
    if caches is None:
        default_caches(model_or_pipeline)
    else:
        set_caches(model_or_pipeline, caches)


def caches_enabled(model_or_pipeline) -> bool:
    state = state_of(unet_of(model_or_pipeline), create=False)
    return bool(state is not None and state.caches)


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
