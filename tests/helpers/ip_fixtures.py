"""Tiny UNets with the real block structure, and random IP-Adapter checkpoints in the
original layout, for parity tests against diffusers' own processors and loader."""
from __future__ import annotations

import copy
import re

import torch
from diffusers import UNet2DConditionModel

CROSS = 32  # cross_attention_dim of the tiny UNets
CLIP = 24  # image-embedding width of the tiny IP-Adapters

#: SDXL's blocks (no attention, cross, cross; 1/2/10 transformer layers, scaled to 1/2/3).
TINY_SDXL = dict(
    sample_size=8,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 4),  # diffusers reads it as the head count here, as in SDXL
    transformer_layers_per_block=(1, 2, 3),
    layers_per_block=2,
    cross_attention_dim=CROSS,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=CROSS + 6 * 8,
)

#: SD1.5's blocks (cross x3, no attention; head dim 8).
TINY_SD15 = dict(
    sample_size=16,
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    layers_per_block=2,
    cross_attention_dim=CROSS,
    norm_num_groups=8,
)

_CACHE = {}


def tiny_unet(kind: str, seed: int = 0, dtype=torch.float32) -> UNet2DConditionModel:
    """A fresh copy of a tiny UNet (built once per kind and seed)."""
    key = (kind, seed)
    if key not in _CACHE:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{"sdxl": TINY_SDXL, "sd15": TINY_SD15}[kind]).eval()
        with torch.no_grad():  # default init leaves to_out near zero; make every layer matter
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        _CACHE[key] = unet
    unet = copy.deepcopy(_CACHE[key])
    return unet if dtype == torch.float32 else unet.to(dtype)


def cross_layers(unet):
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


def _base_image_proj(g, tokens=4):
    return {
        "proj.weight": torch.randn(tokens * CROSS, CLIP, generator=g) * 0.2,
        "proj.bias": torch.randn(tokens * CROSS, generator=g) * 0.1,
        "norm.weight": 1 + torch.randn(CROSS, generator=g) * 0.1,
        "norm.bias": torch.randn(CROSS, generator=g) * 0.1,
    }


def _full_face_image_proj(g):
    return {
        "proj.0.weight": torch.randn(CLIP, CLIP, generator=g) * 0.2,
        "proj.0.bias": torch.randn(CLIP, generator=g) * 0.1,
        "proj.2.weight": torch.randn(CROSS, CLIP, generator=g) * 0.2,
        "proj.2.bias": torch.randn(CROSS, generator=g) * 0.1,
        "proj.3.weight": 1 + torch.randn(CROSS, generator=g) * 0.1,
        "proj.3.bias": torch.randn(CROSS, generator=g) * 0.1,
    }


def _plus_image_proj(seed, tokens=16):
    """Original-layout keys of a random IPAdapterPlusImageProjection (inverse of diffusers' renaming)."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    torch.manual_seed(seed)
    proj = IPAdapterPlusImageProjection(embed_dims=CLIP, output_dims=CROSS, hidden_dims=64, heads=1, num_queries=tokens, depth=4)  # the converter assumes depth 4
    sd = proj.state_dict()
    out = {}
    for key, value in sd.items():
        m = re.match(r"layers\.(\d+)\.(.*)", key)
        if not m:
            out[key] = value
            continue
        i, rest = m.groups()
        renames = {
            "ln0.": "0.norm1.", "ln1.": "0.norm2.", "attn.to_q.": "0.to_q.", "attn.to_out.0.": "0.to_out.",
            "ff.0.": "1.0.", "ff.1.net.0.proj.": "1.1.", "ff.1.net.2.": "1.3.",
        }
        if rest.startswith("attn.to_k."):
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, sd[key.replace("to_k", "to_v")]])
            continue
        if rest.startswith("attn.to_v."):
            continue
        for old, new in renames.items():
            if rest.startswith(old):
                out[f"layers.{i}.{new}{rest[len(old):]}"] = value
                break
        else:
            raise AssertionError(f"unmapped key {key}")
    return out


def random_checkpoint(unet, seed: int = 0, flavour: str = "base") -> dict:
    """A random IP-Adapter state dict in the original layout for ``unet``'s cross layers."""
    g = torch.Generator().manual_seed(seed)
    image_proj = {"base": lambda: _base_image_proj(g), "full": lambda: _full_face_image_proj(g), "plus": lambda: _plus_image_proj(seed)}[flavour]()
    ip = {}
    modules = dict(unet.named_modules())
    for i, name in enumerate(cross_layers(unet)):
        attn = modules[name[: -len(".processor")]]
        shape = (attn.to_k.out_features, attn.to_k.in_features)
        ip[f"{2 * i + 1}.to_k_ip.weight"] = torch.randn(shape, generator=g) * 0.3
        ip[f"{2 * i + 1}.to_v_ip.weight"] = torch.randn(shape, generator=g) * 0.3
    return {"image_proj": image_proj, "ip_adapter": ip}


def unet_inputs(unet, batch=2, seed=0, text_len=7, dtype=torch.float32):
    """Sample, timestep, text states and added conditions for one UNet call."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    s = cfg.sample_size
    kwargs = dict(
        sample=torch.randn(batch, cfg.in_channels, s, s, generator=g).to(dtype),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, text_len, CROSS, generator=g).to(dtype),
    )
    if cfg.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, CROSS, generator=g).to(dtype),
            "time_ids": torch.randn(batch, 6, generator=g).to(dtype),
        }
    return kwargs


def image_embeds(batch, n_images, seed=0, tokens=None, dtype=torch.float32):
    """``[B, n_images, CLIP]`` embeds (or ``[B, n, tokens, CLIP]`` hidden states for Plus/Full-face)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, n_images, CLIP) if tokens is None else (batch, n_images, tokens, CLIP)
    return torch.randn(shape, generator=g).to(dtype)
