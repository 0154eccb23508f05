"""loaders.hub: diffusers-style (id or path, subfolder, weight_name) resolution, offline, on a
hub cache laid out on disk exactly as huggingface_hub writes it (no network)."""
import os

import pytest
import torch

from instantstyle.loaders.hub import (HubDownloadError, attach_image_encoder, looks_local, resolve_checkpoints,
                                      resolve_one)

from helpers.hub_cache import make_hub_cache, save_clip_encoder


def test_hub_id_with_subfolder_and_weight_name_comes_from_the_offline_cache(offline_cache):
    snap = make_hub_cache(offline_cache, "h94/IP-Adapter", {"sdxl_models/ip-adapter_sdxl.safetensors": b"x"})
    path = resolve_one("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.safetensors")
    assert os.path.realpath(path) == os.path.realpath(os.path.join(snap, "sdxl_models", "ip-adapter_sdxl.safetensors"))


def test_diffusers_list_rules(offline_cache):
    make_hub_cache(offline_cache, "h94/IP-Adapter", {"sdxl_models/a.bin": b"a", "sdxl_models/b.bin": b"b"})
    paths = resolve_checkpoints("h94/IP-Adapter", subfolder="sdxl_models", weight_name=["a.bin", "b.bin"])
    assert [os.path.basename(p) for p in paths] == ["a.bin", "b.bin"]
    state = {"image_proj": {}, "ip_adapter": {}}
    assert resolve_checkpoints([state, state]) == [state, state]
    with pytest.raises(ValueError, match="weight_name: expected one entry per checkpoint"):
        resolve_checkpoints(["h94/IP-Adapter"] * 3, weight_name=["a.bin", "b.bin"])
    with pytest.raises(TypeError, match="unexpected keyword argument.*cache_dirr"):
        resolve_checkpoints("h94/IP-Adapter", weight_name="a.bin", cache_dirr="x")


def test_not_in_the_offline_cache_says_so(offline_cache):
    with pytest.raises(HubDownloadError, match="not in the local hub cache"):
        resolve_one("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.safetensors")


def test_missing_local_folder_is_not_a_hub_failure(tmp_path, offline_cache):
    for name in (str(tmp_path / "nope"), "./nope", "IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"):
        with pytest.raises(FileNotFoundError, match="no such file or folder") as info:
            resolve_one(name, "sdxl_models", "ip-adapter_sdxl.safetensors")
        assert not isinstance(info.value, HubDownloadError) and "hub" not in str(info.value)
    assert looks_local("a/b/c.bin") and looks_local("x.safetensors") and not looks_local("h94/IP-Adapter")


def test_existing_folder_without_weight_name_is_explained(tmp_path):
    (tmp_path / "sdxl_models").mkdir()
    (tmp_path / "sdxl_models" / "ip-adapter_sdxl.safetensors").write_bytes(b"x")
    with pytest.raises(IsADirectoryError, match="is a folder: name the checkpoint file.*ip-adapter_sdxl.safetensors"):
        resolve_one(tmp_path, "sdxl_models")
    assert resolve_one(tmp_path, "sdxl_models", "ip-adapter_sdxl.safetensors").endswith("ip-adapter_sdxl.safetensors")
    with pytest.raises(FileNotFoundError, match="weight_name 'other.bin'.*checkpoints there: ip-adapter_sdxl"):
        resolve_one(tmp_path, "sdxl_models", "other.bin")
    file = tmp_path / "sdxl_models" / "ip-adapter_sdxl.safetensors"
    assert resolve_one(file) == str(file)


class _Pipe:
    """Just what diffusers' loader touches: the two slots, register_modules, dtype, device."""

    dtype, device = torch.float32, torch.device("cpu")

    def __init__(self):
        self.image_encoder = self.feature_extractor = None

    def register_modules(self, **modules):
        self.__dict__.update(modules)


def test_image_encoder_from_the_hub_subfolder_as_diffusers(offline_cache, tmp_path):
    save_clip_encoder(tmp_path / "enc")
    make_hub_cache(offline_cache, "h94/IP-Adapter", {"sdxl_models/ip.bin": b"x", "sdxl_models/image_encoder": tmp_path / "enc"})
    pipe = _Pipe()
    assert attach_image_encoder(pipe, "h94/IP-Adapter", "sdxl_models", "image_encoder")
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert pipe.feature_extractor.crop_size == {"height": 32, "width": 32}  # at the encoder's size
    kept = pipe.image_encoder
    assert attach_image_encoder(pipe, "h94/IP-Adapter", "sdxl_models")
    assert pipe.image_encoder is kept  # an encoder already there is never replaced
    with pytest.raises(FileNotFoundError, match="no such folder"):
        attach_image_encoder(_Pipe(), str(tmp_path / "missing"), None, "image_encoder")
    assert not attach_image_encoder(_Pipe(), {"image_proj": {}}, None)  # a state dict carries no encoder


def test_a_bad_checkpoint_attaches_no_encoder(offline_cache, tmp_path):
    """Everything is checked before the pipeline changes: the encoder comes after the checks."""
    import copy

    from helpers.ip_fixtures import random_checkpoint, tiny_unet
    from safetensors.torch import save_file

    from instantstyle.loaders import load_ip_adapter

    save_clip_encoder(tmp_path / "enc")
    unet = tiny_unet("sdxl")
    bad = random_checkpoint(unet, seed=1)
    del bad["ip_adapter"]["3.to_k_ip.weight"], bad["ip_adapter"]["3.to_v_ip.weight"]  # one layer short
    flat = {f"{part}.{k}": v.contiguous() for part in ("image_proj", "ip_adapter") for k, v in bad[part].items()}
    (tmp_path / "ckpt").mkdir()
    save_file(flat, str(tmp_path / "ckpt" / "ip.safetensors"))
    make_hub_cache(offline_cache, "me/bad", {"sdxl_models/ip.safetensors": tmp_path / "ckpt" / "ip.safetensors",
                                             "sdxl_models/image_encoder": tmp_path / "enc"})
    pipe = _Pipe()
    pipe.unet = copy.deepcopy(unet)
    with pytest.raises(ValueError, match="IP layers"):
        load_ip_adapter(pipe, "me/bad", subfolder="sdxl_models", weight_name="ip.safetensors")
    assert getattr(pipe, "image_encoder", None) is None
