"""Checks every UNet load makes before it touches the pipeline (plan -> check -> commit):
the image encoder's width against each adapter's image projection, and the per-image
scale rule the UNet and DiT loaders share."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from instantstyle.loaders import load_ip_adapter
from instantstyle.loaders.report import scaled_weight

from helpers.ip_fixtures import CLIP, random_checkpoint, tiny_unet


class Pipe:
    """What the loader reads of a pipeline: its UNet and its image encoder slot."""

    def __init__(self, unet, image_encoder):
        self.unet, self.image_encoder, self.feature_extractor = unet, image_encoder, None

    def register_modules(self, **modules):
        for name, module in modules.items():
            setattr(self, name, module)


def encoder(hidden_size=CLIP, projection_dim=CLIP):
    config = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, projection_dim=projection_dim,
                              num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    return CLIPVisionModelWithProjection(config).eval()


def snapshot(unet):
    return dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type


@pytest.mark.parametrize("flavour, field, mismatched", [
    ("base", "projection_dim", dict(projection_dim=CLIP + 13)),   # reads image_embeds
    ("plus", "hidden_size", dict(hidden_size=CLIP + 8)),           # reads penultimate hidden states
    ("full", "hidden_size", dict(hidden_size=CLIP + 8)),
])
def test_an_encoder_of_the_wrong_width_is_refused_at_load_time_and_nothing_changes(flavour, field, mismatched):
    unet = tiny_unet("sd15")
    pipe = Pipe(unet, encoder(**mismatched))
    before = snapshot(unet)
    with pytest.raises(ValueError) as info:
        load_ip_adapter(pipe, random_checkpoint(unet, seed=2, flavour=flavour), target="style")
    message = str(info.value)
    assert "\n" not in message and message.startswith("image_encoder:") and f"{field}={CLIP}" in message
    after = snapshot(unet)
    assert after[1] is before[1] and after[2] == before[2]
    assert all(after[0][k] is v for k, v in before[0].items())
    assert pipe.feature_extractor is None


@pytest.mark.parametrize("flavour", ["base", "plus", "full"])
def test_an_encoder_of_the_right_width_loads(flavour):
    unet = tiny_unet("sd15")
    pipe = Pipe(unet, encoder())
    report = load_ip_adapter(pipe, random_checkpoint(unet, seed=2, flavour=flavour), target="style")
    assert report.adapters[0].layers and unet.config.encoder_hid_dim_type == "ip_image_proj"
    assert pipe.feature_extractor is not None  # as diffusers: a processor for the encoder


def test_scale_and_weight_combine_per_image_but_not_two_lists_at_once():
    assert scaled_weight(0.5, 2.0) == 1.0
    assert scaled_weight([1.0, 0.5], 2.0) == [2.0, 1.0]
    assert scaled_weight(0.5, [1.0, 0.0]) == [0.5, 0.0]
    with pytest.raises(ValueError, match="^scale: a per-image scale list"):
        scaled_weight([1.0], [1.0])


def test_the_flux_loader_shares_that_rule():
    from instantstyle.loaders import flux, loader

    assert flux.scaled_weight is loader.scaled_weight is scaled_weight
    assert not hasattr(flux, "_scaled") and not hasattr(loader, "_scaled")
