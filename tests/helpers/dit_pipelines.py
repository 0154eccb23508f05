"""Tiny but real Flux and SD3 pipeline folders, built from configs as diffusers' pipeline
tests do and saved like hub checkpoints, with IP-Adapters in each original layout and the
image/text encoders each adapter pairs with:

- ``flux/model``: FluxPipeline (1 double + 2 single blocks would hide target bugs, so 2 + 3);
  ``flux/xlabs.safetensors`` (XLabs' own key names) with ``flux/clip_image_encoder``
  (CLIP with projection, 32-d) and ``flux/clip_text`` (CLIP text with projection, 32-d);
  ``flux/instantx.bin`` with ``flux/siglip_image_encoder`` (pooled 24-d) and
  ``flux/siglip_text`` (SigLIP's text tower, 24-d).
- ``sd3/model``: StableDiffusion3Pipeline; ``sd3/ip-adapter.bin`` (InstantX SD3.5 layout)
  with ``sd3/siglip_image_encoder`` (patch features, 24-d).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers.dit_fixtures import instantx_flux_state, sd3_state, tiny_flux, tiny_sd3, xlabs_original_file, xlabs_state
from helpers.sdxl_pipelines import write_tokenizer
from helpers.tiny_tokenizers import t5_tokenizer, tiny_t5_config

XLABS_DIM, SIGLIP_DIM = 32, 24


def _clip_tokenizer(folder, length=16):
    from transformers import CLIPTokenizer

    write_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=length)


def _clip_text(cls_name="CLIPTextModel", hidden=32, projection=32):
    import transformers
    from transformers import CLIPTextConfig

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                            projection_dim=projection)
    return getattr(transformers, cls_name)(config)


def _t5():
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(tiny_t5_config())


def _vae(latent_channels):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


def _siglip_vision(folder):
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(1)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=SIGLIP_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=32, patch_size=8)).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)


def _clip_vision(folder):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(2)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   image_size=32, patch_size=8, projection_dim=XLABS_DIM)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def _siglip_text(folder):
    from transformers import SiglipTextConfig, SiglipTextModel

    torch.manual_seed(3)
    SiglipTextModel(SiglipTextConfig(vocab_size=200, hidden_size=SIGLIP_DIM, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=16, projection_size=SIGLIP_DIM,
                                     pad_token_id=0, eos_token_id=1, bos_token_id=None)).save_pretrained(folder)
    t5_tokenizer(str(folder / "tok"), model_max_length=16).save_pretrained(folder)


def _images(root):
    rng = np.random.default_rng(0)
    for name in ("style", "style2"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{name}.png")


def build_tiny_flux(root: Path) -> Path:
    """The ``tiny_flux_dir`` folder (tests/pipelines/conftest.py) under ``root``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = tiny_flux(layers=2, single=3, dtype=torch.float32)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1), text_encoder=_clip_text(),
                        tokenizer=_clip_tokenizer(root / "tok1"), text_encoder_2=_t5(),
                        tokenizer_2=t5_tokenizer(str(root / "tok2")), transformer=transformer)
    pipe.save_pretrained(root / "model")
    xlabs_original_file(xlabs_state(transformer, embed_dim=XLABS_DIM), root / "xlabs.safetensors")
    torch.save(instantx_flux_state(transformer, embed_dim=SIGLIP_DIM), root / "instantx.bin")
    _clip_vision(root / "clip_image_encoder")
    _siglip_vision(root / "siglip_image_encoder")
    _clip_text("CLIPTextModelWithProjection", hidden=16, projection=XLABS_DIM).save_pretrained(root / "clip_text")
    _clip_tokenizer(root / "clip_text")
    _clip_text("CLIPTextModelWithProjection", hidden=16, projection=16).save_pretrained(root / "clip_text_16")
    _clip_tokenizer(root / "clip_text_16")
    _siglip_text(root / "siglip_text")
    _images(root)
    return root


def build_tiny_sd3(root: Path) -> Path:
    """The ``tiny_sd3_dir`` folder (tests/pipelines/conftest.py) under ``root``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = tiny_sd3(layers=3, dtype=torch.float32)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), transformer=transformer,
        text_encoder=_clip_text("CLIPTextModelWithProjection"), tokenizer=_clip_tokenizer(root / "tok1"),
        text_encoder_2=_clip_text("CLIPTextModelWithProjection"), tokenizer_2=_clip_tokenizer(root / "tok2"),
        text_encoder_3=_t5(), tokenizer_3=t5_tokenizer(str(root / "tok3")),
    )
    pipe.save_pretrained(root / "model")
    torch.save(sd3_state(transformer, embed_dim=SIGLIP_DIM, temb=32), root / "ip-adapter.bin")
    _siglip_vision(root / "siglip_image_encoder")
    _siglip_text(root / "siglip_text")
    _images(root)
    return root
