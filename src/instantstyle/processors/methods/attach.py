"""Attaching editing methods to a model, and taking them off.

:func:`apply_method` resolves a method's target through the model's
:class:`~instantstyle.processors.targets.registry.InjectionRegistry`, makes sure every chosen
layer runs a fused processor (a layer that already runs one keeps it: its IP-Adapter
weights and scales stay as they are) and attaches the method to the layer's module,
where the fused processor's pipeline picks it up: at every layer the contributions of
all attached methods and of IP-Adapter end in ONE op call.

Attachments live on the layers' modules, so they survive diffusers re-creating
processors by class (``unload_ip_adapter``: a method on self-attention stays fully
applied) and copies of the model.  A reset that puts a non-instantstyle processor on
one of a method's layers (``set_attn_processor``, ``set_default_attn_processor``, or
``unload_ip_adapter`` for a method on cross-attention) removes that method fully, its
patches beyond attention included, with a warning, at the next forward or query.

:func:`remove_method` detaches a method; a layer left with nothing attached gets back
the very (stateless) diffusers processor object it had (an IP-Adapter layer keeps the fused processor
and with it any scale set meanwhile).  Methods may be applied before or after
``load_ip_adapter``.
"""
from __future__ import annotations

from typing import Dict

from ..core import model_state
from ..core.contributors import Attached
from ..core.models import transformer_family, unet_of
from ..core.validation import describe
from ..dit.conversion import dit_equivalent, dit_plain_classes
from ..dit.method_rules import check_dit_method, dit_gate_steps
from ..targets.registry import Injection, registry_of
from ..unet.conversion import PLAIN_CLASSES, fused_equivalent
from ..wan.conversion import wan_equivalent, wan_plain_classes
from ..wan.image_scale import WAN_GATE_STEPS
from .base import EditingMethod


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
    wan = transformer_family(unet) == "wan"  # self- and cross-attention per block, as a UNet (processors/wan)
    dit = transformer_family(unet) is not None and not wan
    if dit:  # Flux / SD3 joint attention: what is supported there (dit_methods)
        check_dit_method(method)
    # a DiT's joint attention is self- and cross-attention at once (joint_observe): every
    # site is a candidate for either kind
    resolved = registry.resolve(method.target, "any" if dit else method.kind)
    chosen = [s for s in method.select_sites(list(resolved)) if s in resolved]
    if not chosen:
        raise ValueError(f"{method.name}: target {method.target!r} leaves no {method.kind}-attention layer")
    modules = {s.name: s.module for s in registry.sites}
    equivalent = wan_equivalent if wan else dit_equivalent if dit else fused_equivalent
    plain = wan_plain_classes() if wan else dit_plain_classes() if dit else PLAIN_CLASSES
    # build every processor first, so a layer we can't handle leaves the model untouched
    procs = {site: equivalent(site, modules[site].processor) for site in chosen}
    if method.name in model_state.attached(unet):
        remove_method(unet, method.name)
    method.gate.num_train_timesteps = (WAN_GATE_STEPS if wan else dit_gate_steps(transformer_family(unet)) if dit
                                       else int(_train_steps(model_or_pipeline)))
    method.patch_modules(unet)  # may refuse (raise) before anything changed
    entries = {}
    for site, proc in procs.items():
        current = modules[site].processor
        restore = current if type(current) in plain else None  # stateless: safe to give back
        if proc is not current:
            modules[site].set_processor(proc)
        entries[site] = Attached(method, site, resolved[site], restore)
    model_state.attach(unet, method.name, method, entries)
    return registry.injections[f"method:{method.name}"]


def remove_method(model_or_pipeline, method) -> None:
    """Detach a method (instance or name); see the module doc for what each layer gets back."""
    unet = unet_of(model_or_pipeline)
    name = method.name if isinstance(method, EditingMethod) else method
    if not isinstance(name, str):
        raise TypeError(f"method: expected an EditingMethod or its name, got {describe(method)}")
    attached = model_state.attached(unet)
    if name not in attached:
        raise ValueError(f"method: {name!r} is not applied to this model (applied: {sorted(attached) or 'none'})")
    model_state.detach(unet, name)


def applied_methods(model_or_pipeline) -> Dict[str, EditingMethod]:
    """``{name: method}`` of the methods attached to a model (and in effect)."""
    return model_state.attached(unet_of(model_or_pipeline))


def reset_steps(model_or_pipeline) -> None:
    """Restart the step count (``AttentionCall.step``) at 0 for the next UNet call.
    A new pipeline call is detected by itself (the timestep rises again)."""
    model_state.reset_steps(unet_of(model_or_pipeline))
