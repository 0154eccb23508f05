"""Subclasses of every fused processor class are drop-ins too: they construct, carry the
precomputed call signature (their own, when they override ``__call__``), pass diffusers'
exact-class checks, and give diffusers' own results when diffusers' loaders build them in
place of diffusers' classes (as diffusers' own IP-Adapter tests do with a swapped class)."""
from __future__ import annotations

import copy
import inspect
import pickle

import diffusers.models.attention_processor as attention_processor
import diffusers.models.transformers.transformer_flux as transformer_flux
import diffusers.loaders.transformer_sd3 as sd3_loader
import pytest
import torch
from diffusers.loaders import IPAdapterMixin
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from helpers.dit_fixtures import embeds, flux_inputs, sd3_inputs, sd3_state, tiny_flux, tiny_sd3, xlabs_state
from helpers.ip_fixtures import image_embeds, random_checkpoint, tiny_unet, unet_inputs

from instantstyle.kernels import check_close
from instantstyle.processors import (
    FusedAttnProcessor,
    FusedFluxAttnProcessor,
    FusedFluxInstantXAttnProcessor,
    FusedFluxIPAdapterAttnProcessor,
    FusedIPAdapterAttnProcessor,
    FusedSD3IPAdapterJointAttnProcessor,
    FusedSD3JointAttnProcessor,
)
from instantstyle.processors.core.model_state import runs_pipeline

#: class -> constructor arguments
CLASSES = {
    FusedIPAdapterAttnProcessor: (64, 32, [4]),
    FusedAttnProcessor: (),
    FusedFluxIPAdapterAttnProcessor: (64, 32, [4]),
    FusedFluxInstantXAttnProcessor: (64, 32, [8], 1.0, None, None, None, 16),
    FusedFluxAttnProcessor: (),
    FusedSD3IPAdapterJointAttnProcessor: (64, 24, 16, 32),
    FusedSD3JointAttnProcessor: (),
}
#: ours -> diffusers' counterpart, where that one counts for ``set_default_attn_processor``
CROSS = {FusedIPAdapterAttnProcessor, FusedAttnProcessor, FusedFluxIPAdapterAttnProcessor,
         FusedFluxInstantXAttnProcessor, FusedSD3IPAdapterJointAttnProcessor}


#: one bare subclass per class, at module level so that pickle finds it by name
BARE = {}
for _parent in CLASSES:
    BARE[_parent] = globals()[f"Mine{_parent.__name__}"] = type(f"Mine{_parent.__name__}", (_parent,), {"__module__": __name__})


def bound_parameters(cls) -> list:
    return list(inspect.signature(cls.__call__).parameters)[1:]


@pytest.mark.parametrize("parent", list(CLASSES), ids=lambda c: c.__name__)
def test_a_bare_subclass_constructs_and_keeps_the_signature(parent):
    sub = BARE[parent]
    proc = sub(*CLASSES[parent])
    assert runs_pipeline(proc)
    assert list(inspect.signature(proc.__call__).parameters) == bound_parameters(parent)
    assert (sub in attention_processor.CROSS_ATTENTION_PROCESSORS) == (parent in CROSS)
    again = pickle.loads(pickle.dumps(proc))
    assert type(again) is sub and again.__call__.processor is again
    assert copy.deepcopy(proc).__call__.processor is not proc


@pytest.mark.parametrize("parent", list(CLASSES), ids=lambda c: c.__name__)
def test_a_subclass_that_overrides_call_gets_its_own_signature(parent):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, my_option=None, **kwargs):
        return parent.__call__(self, attn, hidden_states, encoder_hidden_states, **kwargs)

    sub = type("Mine", (parent,), {"__call__": __call__})
    proc = sub(*CLASSES[parent])
    assert list(inspect.signature(proc.__call__).parameters) == ["attn", "hidden_states", "encoder_hidden_states", "my_option", "kwargs"]


class Pipe(IPAdapterMixin):
    def __init__(self, unet):
        self.unet = unet


class MineIP(FusedIPAdapterAttnProcessor):
    """What a user writes to extend our processor: a counter on top of the same math."""

    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


def unet_forward(unet):
    kwargs = unet_inputs(unet, batch=2, seed=0)
    kwargs["timestep"] = torch.tensor(500)
    kwargs["added_cond_kwargs"]["image_embeds"] = [image_embeds(2, 1, seed=7)]
    with torch.no_grad():
        return unet(**kwargs).sample


def test_diffusers_unet_loader_builds_our_subclass_in_place_of_its_own(monkeypatch):
    unet = tiny_unet("sdxl")
    ckpt = random_checkpoint(unet, seed=3)
    ref = copy.deepcopy(unet)
    ref._load_ip_adapter_weights([copy.deepcopy(ckpt)])
    monkeypatch.setattr(attention_processor, "IPAdapterAttnProcessor2_0", MineIP)
    ours = copy.deepcopy(unet)
    ours._load_ip_adapter_weights([copy.deepcopy(ckpt)])
    monkeypatch.undo()
    assert any(type(p) is MineIP for p in ours.attn_processors.values())
    MineIP.calls = 0
    check_close(unet_forward(ours), unet_forward(ref), "fp32")
    assert MineIP.calls > 0
    for model in (ours, ref):  # scales, default processors and unloading as with diffusers' own class
        Pipe(model).set_ip_adapter_scale(0.5)
    check_close(unet_forward(ours), unet_forward(ref), "fp32")
    ours.set_default_attn_processor()
    assert all(type(p) is not MineIP for p in ours.attn_processors.values())


def test_unload_gives_back_plain_processors_for_a_subclass(monkeypatch):
    unet = tiny_unet("sd15")
    monkeypatch.setattr(attention_processor, "IPAdapterAttnProcessor2_0", MineIP)
    unet._load_ip_adapter_weights([random_checkpoint(unet, seed=1)])
    monkeypatch.undo()
    pipe = Pipe(unet)
    pipe.unload_ip_adapter()
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}


def flux_run(model, ip):
    with torch.no_grad():
        return model(**flux_inputs(), joint_attention_kwargs={"ip_adapter_image_embeds": ip}).sample


def test_diffusers_flux_loader_builds_our_subclass_in_place_of_its_own(monkeypatch):
    model = tiny_flux()
    state = xlabs_state(model)
    ref = copy.deepcopy(model)
    ref._load_ip_adapter_weights([copy.deepcopy(state)], low_cpu_mem_usage=False)
    ref.to(torch.float64)
    sub = type("MineFlux", (FusedFluxIPAdapterAttnProcessor,), {})
    monkeypatch.setattr(transformer_flux, "FluxIPAdapterAttnProcessor", sub)
    ours = copy.deepcopy(model)
    ours._load_ip_adapter_weights([copy.deepcopy(state)], low_cpu_mem_usage=False)
    monkeypatch.undo()
    ours.to(torch.float64)
    assert sum(type(p) is sub for p in ours.attn_processors.values()) == model.config.num_layers
    ip = [embeds(2, 1, 32)]
    assert (flux_run(ours, ip) - flux_run(ref, ip)).abs().max() < 1e-12


def test_diffusers_sd3_loader_builds_our_subclass_in_place_of_its_own(monkeypatch):
    model = tiny_sd3()
    state = sd3_state(model)
    ref = copy.deepcopy(model)
    ref._load_ip_adapter_weights(copy.deepcopy(state), low_cpu_mem_usage=False)
    ref.to(torch.float64)
    sub = type("MineSD3", (FusedSD3IPAdapterJointAttnProcessor,), {})
    monkeypatch.setattr(sd3_loader, "SD3IPAdapterJointAttnProcessor2_0", sub)
    ours = copy.deepcopy(model)
    ours._load_ip_adapter_weights(copy.deepcopy(state), low_cpu_mem_usage=False)
    monkeypatch.undo()
    ours.to(torch.float64)
    assert any(type(p) is sub for p in ours.attn_processors.values())
    ip = embeds(2, 1, 24)
    with torch.no_grad():
        got = ours(**sd3_inputs(), joint_attention_kwargs={"ip_adapter_image_embeds": ip}).sample
        want = ref(**sd3_inputs(), joint_attention_kwargs={"ip_adapter_image_embeds": ip}).sample
    assert (got - want).abs().max() < 1e-12
