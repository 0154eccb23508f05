"""Attaching methods to a UNet, and the dispatch that composes them at one layer.

:func:`apply_method` resolves a method's target through the UNet's
:class:`~instantstyle.processors.registry.InjectionRegistry`, makes sure every chosen
layer runs a fused processor (``FusedAttnProcessor`` for plain layers; layers that
already hold IP-Adapter weights keep their ``FusedIPAdapterAttnProcessor``) and appends
the method to that processor's ``methods`` list.  The processor parses its inputs and
its own IP streams as usual and hands everything to :func:`run_methods`, which runs the
hooks in kind order (4, 3, 2, 1) and ends in ONE ``decoupled_attention`` call:
IP-Adapter's streams and a method's joint keys meet in the same launch.  Only a layer
with an active observer (kind 5) materialises the probabilities (unfused).

:func:`remove_method` detaches a method; a layer left without methods gets back the
very processor object it had before, so outputs are restored exactly.  A method may
also patch modules beyond attention (``EditingMethod.patch_modules``: StyleAligned's
shared GroupNorm statistics); removing it calls ``unpatch_modules``, which restores them.

Apply methods after ``load_ip_adapter``: loading replaces the processors of every
cross-attention layer (and so drops methods attached there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ...kernels import decoupled_attention
from ..registry import Injection, registry_of
from ..sites import unet_of
from ..validation import describe
from .base import AttentionCall, EditingMethod

_STATE = "_instantstyle_methods"


@dataclass
class StepInfo:
    """Shared by every layer of one UNet: what the forward pre-hook saw last."""

    step: int = -1
    timestep: Optional[float] = None
    sample_size: Optional[tuple] = None


@dataclass
class Attached:
    """One method at one layer (an entry of ``processor.methods``)."""

    method: EditingMethod
    site: str
    weight: object
    info: StepInfo


@dataclass
class _MethodsState:
    info: StepInfo = field(default_factory=StepInfo)
    applied: Dict[str, List[str]] = field(default_factory=dict)  # method name -> sites
    methods: Dict[str, EditingMethod] = field(default_factory=dict)
    originals: Dict[str, object] = field(default_factory=dict)  # site -> processor before us
    hook: object = None


# -- the dispatch ---------------------------------------------------------------------
def _open(method: EditingMethod) -> Optional[torch.Tensor]:
    """The gate as a 0-D tensor, or None when it never closes (no blending needed)."""
    return None if method.gate.always_open else method.gate.value


def _gated(gate, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    # torch.where, not a Python branch: a compiled graph reads the gate at run time
    return new if gate is None else torch.where(gate.to(new.device) > 0, new, old)


def _additive(bias: Optional[torch.Tensor], batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` additive float bias (bool masks: True = attend); zeros for None."""
    if bias is None:
        return like.new_zeros(batch, length, dtype=torch.float32 if like.dtype != torch.float64 else torch.float64)
    if bias.dtype == torch.bool:
        return torch.zeros(bias.shape, dtype=torch.float32, device=bias.device).masked_fill(~bias, float("-inf"))
    return bias


def _joint(call: AttentionCall, entries) -> tuple:
    """Concatenate every method's joint keys; returns ``(k, v, bias)`` or Nones."""
    ks, vs, biases, any_bias = [], [], [], False
    for e in entries:
        call.weight = e.weight
        got = e.method.joint_kv(call)
        if got is None:
            continue
        k, v, bias = got
        gate = _open(e.method)
        any_bias = any_bias or bias is not None or gate is not None
        bias = _additive(bias, k.shape[0], k.shape[1], k)
        if gate is not None:  # closed: log(0) = -inf hides the joint keys, exactly
            bias = bias + torch.log(gate.to(bias.device, bias.dtype))
        ks.append(k)
        vs.append(v)
        biases.append(bias)
    if not ks:
        return None, None, None
    cat = (lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts, dim=1))  # noqa: E731
    return cat(ks), cat(vs), (cat(biases) if any_bias else None)


def _streams(call: AttentionCall, entries) -> list:
    out = list(call.streams)
    for e in entries:
        gate = _open(e.method)
        call.weight = e.weight
        for s in e.method.streams(call):
            if len(s) not in (3, 4):
                raise ValueError(f"{e.method.name}.streams: expected (k, v, scale) or (k, v, scale, mask) items, got {len(s)} values")
            k, v, scale = s[:3]
            mask = s[3] if len(s) == 4 else None
            scale = torch.as_tensor(scale, dtype=torch.float32)
            if gate is not None:
                scale = scale.to(gate.device) * gate
            out.append((k, v, scale, mask))
    return out


def _observers(call: AttentionCall, entries) -> list:
    """Observers that want this call: eager checks (maps are an eager-only feature)."""
    return [e.method for e in entries if bool(e.method.gate.value > 0) and e.method.observing(call)]


def _materialised(call, joint_k, joint_v, joint_bias, streams, full_mask):
    """The same math as the op with the probabilities kept: ``(out (B,N,H,D), probs (B,H,N,L))``."""
    heads_first = lambda t: t.transpose(1, 2)  # noqa: E731
    q = heads_first(call.q)
    k, v = call.k, call.v
    batch, lt = k.shape[0], k.shape[1]
    text = None
    if full_mask is not None:
        text = full_mask if full_mask.dtype != torch.bool else _additive(full_mask, 0, 0, q)
    elif call.text_bias is not None:
        text = _additive(call.text_bias, batch, lt, q)[:, None, None, :]
    if joint_k is not None:
        k, v = torch.cat([k, joint_k], 1), torch.cat([v, joint_v], 1)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32  # maps in at least fp32
    logits = q.to(wide) @ heads_first(k).to(wide).transpose(-1, -2) * q.shape[-1] ** -0.5
    if text is not None:
        logits[..., :lt] += text.to(logits.dtype)
    if joint_bias is not None:
        logits[..., lt:] += joint_bias[:, None, None, :].to(logits.dtype)
    probs = logits.softmax(-1)
    out = (probs @ heads_first(v).to(wide)).to(q.dtype)
    for ik, iv, scale, mask in streams:
        ip = torch.nn.functional.scaled_dot_product_attention(q, heads_first(ik), heads_first(iv))
        weight = torch.as_tensor(scale).to(q.dtype).reshape(-1, 1, 1, 1)
        if mask is not None:
            weight = weight * mask.to(q.dtype)[:, None, :, None]
        out = out + weight * ip
    return heads_first(out), probs


def run_methods(entries: List[Attached], p, streams) -> torch.Tensor:
    """``(B, N, H, D)`` attention output of one layer with ``entries`` applied.

    ``p`` is the processor's :class:`~instantstyle.processors.attention_io.Projected`,
    ``streams`` its own ``(ip_k, ip_v, scale, mask)`` IP streams.
    """
    info = entries[0].info
    call = AttentionCall(
        site=entries[0].site, weight=entries[0].weight, q=p.q, k=p.k, v=p.v, text_bias=p.text_bias,
        streams=list(streams), step=info.step, timestep=info.timestep, sample_size=info.sample_size,
    )
    by_kind = lambda k: [e for e in entries if k in e.method.kinds]  # noqa: E731
    for e in by_kind(4):
        call.weight = e.weight
        q, k = e.method.transform_qk(call)
        gate = _open(e.method)
        call.q, call.k = _gated(gate, q, call.q), _gated(gate, k, call.k)
    for e in by_kind(3):
        call.weight = e.weight
        k, v = e.method.replace_kv(call)
        gate = _open(e.method)
        call.k, call.v = _gated(gate, k, call.k), _gated(gate, v, call.v)
    joint_k, joint_v, joint_bias = _joint(call, by_kind(2))
    all_streams = _streams(call, by_kind(1))
    observers = _observers(call, by_kind(5))
    if observers or p.fallback_reason is not None:
        out, probs = _materialised(call, joint_k, joint_v, joint_bias, all_streams, p.full_mask)
        for method in observers:
            method.observe(call, probs)
        return out
    return decoupled_attention(
        call.q, call.k, call.v, [s[0] for s in all_streams], [s[1] for s in all_streams],
        [s[2] for s in all_streams], [s[3] for s in all_streams], call.text_bias,
        joint_k=joint_k, joint_v=joint_v, joint_bias=joint_bias,
    )


# -- attaching ------------------------------------------------------------------------
def _state(unet, create: bool = True) -> Optional[_MethodsState]:
    state = unet.__dict__.get(_STATE)
    if state is None and create:
        state = _MethodsState()
        unet.__dict__[_STATE] = state
    return state


def _step_hook(unet, args, kwargs):
    state = _state(unet, create=False)
    if state is None:
        return
    sample = kwargs.get("sample", args[0] if args else None)
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    state.info.step += 1
    state.info.sample_size = tuple(sample.shape[-2:]) if isinstance(sample, torch.Tensor) and sample.ndim == 4 else None
    if timestep is not None:
        state.info.timestep = float(torch.as_tensor(timestep).reshape(-1)[0])
    for method in state.methods.values():
        if timestep is not None:
            method.gate.update(timestep)
        method.on_step(state.info.step, state.info.timestep)


def _fused_processor_for(site, proc):
    """The fused processor to hold methods at ``site``: ``proc`` itself, or a new one."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from ..accelerate import _IP_CLASSES, fuse_ip_processor
    from ..fused_processor import FusedAttnProcessor, FusedIPAdapterAttnProcessor

    if isinstance(proc, (FusedAttnProcessor, FusedIPAdapterAttnProcessor)):
        return proc
    if isinstance(proc, _IP_CLASSES):
        return fuse_ip_processor(proc)
    if type(proc) in (AttnProcessor, AttnProcessor2_0):
        return FusedAttnProcessor()
    raise TypeError(
        f"method target: layer {site} runs a {type(proc).__name__}; editing methods need diffusers' "
        "AttnProcessor(2_0), an IP-Adapter processor or an instantstyle fused processor there"
    )


def _train_steps(model) -> int:
    return getattr(getattr(model, "scheduler", None), "config", {}).get("num_train_timesteps", 1000)


def apply_method(model_or_pipeline, method: EditingMethod) -> Injection:
    """Attach ``method`` to its target layers; replaces a method of the same name.

    Several methods may be attached at once (also at the same layers); each layer then
    composes them into one fused op call.  Returns the registry record
    (``registry_of(unet).injections["method:<name>"]``).
    """
    if not isinstance(method, EditingMethod):
        raise TypeError(f"method: expected an EditingMethod instance, got {describe(method)}")
    unet = unet_of(model_or_pipeline)
    registry = registry_of(unet)
    resolved = registry.resolve(method.target, method.kind)
    chosen = [s for s in method.select_sites(list(resolved)) if s in resolved]
    if not chosen:
        raise ValueError(f"{method.name}: target {method.target!r} leaves no {method.kind}-attention layer")
    if method.name in _state(unet).applied:
        remove_method(unet, method.name)
    state = _state(unet)
    method.gate.num_train_timesteps = int(_train_steps(model_or_pipeline))
    modules = {s.name: s.module for s in registry.sites}
    # build every processor first, so a layer we can't handle leaves the UNet untouched
    procs = {site: _fused_processor_for(site, modules[site].processor) for site in chosen}
    method.patch_modules(unet)  # may refuse (raise) before anything changed
    for site, proc in procs.items():
        current = modules[site].processor
        if proc is not current:
            state.originals.setdefault(site, current)
            modules[site].set_processor(proc)
        proc.methods.append(Attached(method, site, resolved[site], state.info))
    state.applied[method.name] = chosen
    state.methods[method.name] = method
    if state.hook is None:
        state.hook = unet.register_forward_pre_hook(_step_hook, with_kwargs=True)
    injection = Injection(method.name, method.kind, {s: resolved[s] for s in chosen}, {"target": method.target, "kinds": method.kinds})
    registry.injections[f"method:{method.name}"] = injection
    return injection


def remove_method(model_or_pipeline, method) -> None:
    """Detach a method (instance or name); layers left without methods get their old processor back."""
    unet = unet_of(model_or_pipeline)
    state = _state(unet, create=False)
    name = method.name if isinstance(method, EditingMethod) else method
    if not isinstance(name, str):
        raise TypeError(f"method: expected an EditingMethod or its name, got {describe(method)}")
    if state is None or name not in state.applied:
        attached = sorted(state.applied) if state else []
        raise ValueError(f"method: {name!r} is not applied to this model (applied: {attached or 'none'})")
    modules = {s.name: s.module for s in registry_of(unet).sites}
    for site in state.applied.pop(name):
        proc = modules[site].processor
        methods = getattr(proc, "methods", None)
        if not any(e.method.name == name for e in methods or ()):
            # the processor was replaced since (e.g. by load_ip_adapter): it is not ours to restore
            state.originals.pop(site, None)
            continue
        methods[:] = [e for e in methods if e.method.name != name]
        if not methods and site in state.originals:
            modules[site].set_processor(state.originals.pop(site))
    state.methods.pop(name).unpatch_modules(unet)
    registry_of(unet).injections.pop(f"method:{name}", None)
    if not state.applied:
        state.hook.remove()
        del unet.__dict__[_STATE]


def applied_methods(model_or_pipeline) -> Dict[str, EditingMethod]:
    """``{name: method}`` of the methods attached to a model."""
    state = _state(unet_of(model_or_pipeline), create=False)
    return dict(state.methods) if state else {}


def reset_steps(model_or_pipeline) -> None:
    """Restart the step count (``AttentionCall.step``) at 0 for the next UNet call."""
    state = _state(unet_of(model_or_pipeline), create=False)
    if state is not None:
        state.info.step = -1
