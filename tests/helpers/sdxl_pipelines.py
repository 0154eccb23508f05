"""Tiny but real SDXL and SD1.5 model folders, built in code and saved like hub checkpoints.

Every component is the real diffusers/transformers class, scaled down: an SDXL-structured
UNet, a VAE, two CLIP text encoders with tokenizers read from vocab files written here, a
CLIP vision encoder with projection and its image processor, a ControlNet, and a random
IP-Adapter checkpoint in the original layout (``.bin`` and ``.safetensors``).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from helpers.tiny_tokenizers import write_clip_vocab

CROSS = 32  # UNet cross_attention_dim = text_encoder + text_encoder_2 hidden sizes
PROJ = 24  # projected CLIP width shared by text_encoder_2 and the image encoder ("bigG" stand-in)
TIME_DIM = 8


def write_tokenizer(folder) -> None:
    """vocab.json + merges.txt: every byte as a token, with and without the word-end mark."""
    write_clip_vocab(str(folder))


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    write_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=16)


def _text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513, **extra)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 3), layers_per_block=2,
        cross_attention_dim=CROSS, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJ + 6 * TIME_DIM,
    )


def random_ip_adapter(unet, seed: int = 0) -> dict:
    """A base (4-token) IP-Adapter in the original layout, ids 1, 3, 5, ... over attn2 layers."""
    g = torch.Generator().manual_seed(seed)
    ip = {}
    modules = dict(unet.named_modules())
    attn2 = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    for i, name in enumerate(attn2):
        shape = (modules[name].to_k.out_features, modules[name].to_k.in_features)
        ip[f"{2 * i + 1}.to_k_ip.weight"] = torch.randn(shape, generator=g) * 0.5
        ip[f"{2 * i + 1}.to_v_ip.weight"] = torch.randn(shape, generator=g) * 0.5
    image_proj = {
        "proj.weight": torch.randn(4 * CROSS, PROJ, generator=g) * 0.3,
        "proj.bias": torch.randn(4 * CROSS, generator=g) * 0.1,
        "norm.weight": torch.ones(CROSS),
        "norm.bias": torch.zeros(CROSS),
    }
    return {"image_proj": image_proj, "ip_adapter": ip}


def _image_encoder(folder):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                             num_attention_heads=2, image_size=32, patch_size=8, projection_dim=PROJ))
    encoder.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def _save_ip_adapter(unet, root) -> None:
    state = random_ip_adapter(unet)
    torch.save(state, root / "ip-adapter.bin")
    flat = {f"{part}.{k}": v.contiguous() for part, sub in state.items() for k, v in sub.items()}
    from safetensors.torch import save_file

    save_file(flat, str(root / "ip-adapter.safetensors"))


def _save_images(root) -> None:
    rng = np.random.default_rng(0)
    for name in ("style", "style2", "control"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{name}.png")


def _perturb(model):
    with torch.no_grad():  # default init leaves some layers at zero: make every layer matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)


def build_tiny_sd15(root):
    """The ``tiny_sd15`` folder (tests/pipelines/conftest.py) under ``root``: a saved tiny SD1.5
    pipeline (cross dim 32) with a ViT-H-like setup: the image encoder's projected space (24-d)
    is NOT the pipeline's text space, so content subtraction needs the separate
    ``content_text_encoder`` folder (a CLIP text model with projection + tokenizer)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    unet = _perturb(UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, layers_per_block=2, cross_attention_dim=CROSS, norm_num_groups=8,
    ))
    text_config = _text_config()
    text_config.hidden_size = CROSS
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), unet=unet, scheduler=EulerDiscreteScheduler(),
                                   text_encoder=CLIPTextModel(text_config), tokenizer=_tokenizer(root / "tok"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "model")
    CLIPTextModelWithProjection(_text_config(projection_dim=PROJ)).save_pretrained(root / "content_text_encoder")
    _tokenizer(root / "tok_content").save_pretrained(root / "content_text_encoder")
    _image_encoder(root / "image_encoder")
    _save_ip_adapter(unet, root)
    _save_images(root)
    return root


def build_tiny_sdxl(root):
    """The ``tiny_sdxl`` folder (tests/pipelines/conftest.py) under ``root``: a saved tiny SDXL
    pipeline, image encoder, ControlNet, IP-Adapter and images (also the README test's models)."""
    from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = _perturb(tiny_unet())
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), unet=unet, scheduler=EulerDiscreteScheduler(),
        text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(root / "tok1"),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=PROJ)), tokenizer_2=_tokenizer(root / "tok2"),
    )
    pipe.save_pretrained(root / "model")
    _image_encoder(root / "image_encoder")
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(root / "controlnet")
    _save_ip_adapter(unet, root)
    _save_images(root)
    return root
