"""The diffusers side of a whole-UNet comparison: a copy of a tiny UNet loaded with diffusers'
own IP-Adapter loader and ``set_ip_adapter_scale``, and one forward with image embeds."""
from __future__ import annotations

import copy

import torch
from diffusers.loaders import IPAdapterMixin

from helpers.ip_fixtures import unet_inputs


class IPAdapterPipe(IPAdapterMixin):
    """Just enough pipeline for diffusers' IPAdapterMixin methods."""

    def __init__(self, unet):
        self.unet = unet


def diffusers_loaded(unet, checkpoints, scale_config):
    """A copy of ``unet`` with diffusers' loader and processors, scales set as ``scale_config``."""
    ref = copy.deepcopy(unet)
    ref._load_ip_adapter_weights(list(checkpoints))
    IPAdapterPipe(ref).set_ip_adapter_scale(scale_config)
    return ref


def forward(unet, embeds, seed=0, **extra):
    """One UNet step on ``unet_inputs`` with ``embeds`` as the image embeds."""
    kwargs = unet_inputs(unet, batch=embeds[0].shape[0], seed=seed)
    added = dict(kwargs.pop("added_cond_kwargs", {}), image_embeds=list(embeds))
    with torch.no_grad():
        return unet(**kwargs, added_cond_kwargs=added, **extra).sample
