"""load_ip_adapter on Flux/SD3 pipelines honours image_encoder_folder (next to the adapter, or a
folder / hub id of its own), checks the encoder family per format, and leaves the model as it
was when the encoder is missing or wrong; offline, on a hub cache laid out as huggingface_hub's."""
import pytest
import torch

from instantstyle import load_ip_adapter

from helpers.dit_fixtures import instantx_flux_state, tiny_flux, xlabs_original_file, xlabs_state
from helpers.hub_cache import make_hub_cache, save_clip_encoder


class _FluxPipe:
    """The slots diffusers' Flux pipeline has: transformer, image_encoder, feature_extractor."""

    dtype, device = torch.float32, torch.device("cpu")

    def __init__(self):
        self.transformer = tiny_flux(dtype=torch.float32)
        self.image_encoder = self.feature_extractor = None

    def register_modules(self, **modules):
        self.__dict__.update(modules)


def _siglip(folder):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=32, patch_size=8)).save_pretrained(folder)


@pytest.fixture
def repos(offline_cache, tmp_path):
    save_clip_encoder(tmp_path / "clip")
    _siglip(tmp_path / "siglip")
    xlabs_original_file(xlabs_state(tiny_flux()), tmp_path / "ip_adapter.safetensors")
    torch.save(instantx_flux_state(tiny_flux(), embed_dim=24), tmp_path / "ip-adapter.bin")
    make_hub_cache(offline_cache, "XLabs-AI/flux-ip-adapter", {"ip_adapter.safetensors": tmp_path / "ip_adapter.safetensors"})
    make_hub_cache(offline_cache, "openai/clip-vit-large-patch14", {"config.json": tmp_path / "clip" / "config.json",
                                                                    "model.safetensors": tmp_path / "clip" / "model.safetensors"})
    make_hub_cache(offline_cache, "InstantX/FLUX.1-dev-IP-Adapter", {"ip-adapter.bin": tmp_path / "ip-adapter.bin",
                                                                     "image_encoder": tmp_path / "siglip"})
    return tmp_path


def test_xlabs_gets_clip_from_a_hub_id_of_its_own(repos):
    pipe = _FluxPipe()
    report = load_ip_adapter(pipe, "XLabs-AI/flux-ip-adapter", weight_name="ip_adapter.safetensors",
                             image_encoder_folder="openai/clip-vit-large-patch14")
    assert report.format == "xlabs"
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert type(pipe.feature_extractor).__name__.startswith("CLIPImageProcessor")


def test_instantx_gets_siglip_next_to_the_adapter_by_default(repos):
    pipe = _FluxPipe()
    assert load_ip_adapter(pipe, "InstantX/FLUX.1-dev-IP-Adapter", weight_name="ip-adapter.bin").format == "instantx"
    assert type(pipe.image_encoder).__name__ == "SiglipVisionModel"
    assert type(pipe.feature_extractor).__name__.startswith("SiglipImageProcessor")
    bare = _FluxPipe()  # no folder anywhere under the default name: embeds only, as before
    load_ip_adapter(bare, "XLabs-AI/flux-ip-adapter", weight_name="ip_adapter.safetensors")
    assert bare.image_encoder is None
    skipped = _FluxPipe()
    load_ip_adapter(skipped, "InstantX/FLUX.1-dev-IP-Adapter", weight_name="ip-adapter.bin", image_encoder_folder=None)
    assert skipped.image_encoder is None


def test_wrong_or_missing_encoder_leaves_the_model_unchanged(repos):
    pipe = _FluxPipe()
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match=r"image_encoder_folder: a xlabs adapter needs a CLIP ViT-L/14 .*got a SIGLIP encoder"):
        load_ip_adapter(pipe, "XLabs-AI/flux-ip-adapter", weight_name="ip_adapter.safetensors",
                        image_encoder_folder=str(repos / "siglip"))
    with pytest.raises(ValueError, match=r"a instantx adapter needs a SigLIP encoder .*got a CLIP encoder"):
        load_ip_adapter(pipe, "InstantX/FLUX.1-dev-IP-Adapter", weight_name="ip-adapter.bin",
                        image_encoder_folder="openai/clip-vit-large-patch14")
    with pytest.raises(FileNotFoundError, match=r"image_encoder_folder: expected an image encoder .*found none at"):
        load_ip_adapter(pipe, "XLabs-AI/flux-ip-adapter", weight_name="ip_adapter.safetensors", image_encoder_folder="clip_l")
    assert dict(pipe.transformer.attn_processors) == before and pipe.image_encoder is None
    assert getattr(pipe.transformer, "encoder_hid_proj", None) is None
