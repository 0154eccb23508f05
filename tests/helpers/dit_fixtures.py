"""Tiny Flux and SD3 transformers (diffusers' test configs) and IP-Adapter checkpoints in
each original layout, written here with random weights."""
from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

INNER, JOINT = 32, 32  # Flux: 2 heads x 16; joint_attention_dim


def tiny_flux(layers=2, single=3, dtype=torch.float64):
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=JOINT, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).to(dtype)


def tiny_sd3(layers=3, dtype=torch.float64):
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=layers, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                 pooled_projection_dim=64, out_channels=4, qk_norm="rms_norm").to(dtype)


def _r(*shape, seed_gen):
    return torch.randn(*shape, generator=seed_gen) * 0.3


def xlabs_state(model, seed=1, embed_dim=32, tokens=4):
    """diffusers' converter layout: ids over the double-stream blocks, biased K/V."""
    g = torch.Generator().manual_seed(seed)
    ip = {}
    for i in range(model.config.num_layers):
        for part in ("to_k_ip", "to_v_ip"):
            ip[f"{i}.{part}.weight"] = _r(INNER, JOINT, seed_gen=g)
            ip[f"{i}.{part}.bias"] = _r(INNER, seed_gen=g)
    proj = {"proj.weight": _r(JOINT * tokens, embed_dim, seed_gen=g), "proj.bias": _r(JOINT * tokens, seed_gen=g),
            "norm.weight": 1 + _r(JOINT, seed_gen=g), "norm.bias": _r(JOINT, seed_gen=g)}
    return {"image_proj": proj, "ip_adapter": ip}


def xlabs_original_file(state, path):
    """XLabs' own safetensors key names (double_blocks.N.processor.ip_adapter_double_stream_*)."""
    from safetensors.torch import save_file

    flat = {f"ip_adapter_proj_model.{k}": v for k, v in state["image_proj"].items()}
    for key, v in state["ip_adapter"].items():
        i, part, p = key.split(".")
        name = {"to_k_ip": "ip_adapter_double_stream_k_proj", "to_v_ip": "ip_adapter_double_stream_v_proj"}[part]
        flat[f"double_blocks.{i}.processor.{name}.{p}"] = v.contiguous()
    save_file(flat, str(path))


def instantx_flux_state(model, seed=2, embed_dim=24, tokens=8):
    """Shakker-Labs' layout: ModuleList over 19 double + 38 single processors, bias-free K/V."""
    g = torch.Generator().manual_seed(seed)
    n = model.config.num_layers + model.config.num_single_layers
    ip = {f"{i}.{part}.weight": _r(INNER, JOINT, seed_gen=g) for i in range(n) for part in ("to_k_ip", "to_v_ip")}
    proj = {"proj.0.weight": _r(2 * embed_dim, embed_dim, seed_gen=g), "proj.0.bias": _r(2 * embed_dim, seed_gen=g),
            "proj.2.weight": _r(JOINT * tokens, 2 * embed_dim, seed_gen=g), "proj.2.bias": _r(JOINT * tokens, seed_gen=g),
            "norm.weight": 1 + _r(JOINT, seed_gen=g), "norm.bias": _r(JOINT, seed_gen=g)}
    return {"image_proj": proj, "ip_adapter": ip}


def sd3_state(model, seed=3, embed_dim=24, temb=32):
    """diffusers' SD3 loader layout (InstantX SD3.5-Large), every joint block."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    torch.manual_seed(seed)
    hidden = model.config.attention_head_dim * model.config.num_attention_heads
    ip = {}
    for i in range(model.config.num_layers):
        p = SD3IPAdapterJointAttnProcessor2_0(hidden, hidden, model.config.attention_head_dim, timesteps_emb_dim=temb)
        for k, v in p.state_dict().items():
            ip[f"{i}.{k}"] = torch.randn_like(v) * 0.3 + (1.0 if k.startswith("norm_") and "linear" not in k else 0.0)
    proj = IPAdapterTimeImageProjection(embed_dim=embed_dim, output_dim=hidden, hidden_dim=temb, heads=2, num_queries=4, timestep_in_dim=16)
    return {"image_proj": proj.state_dict(), "ip_adapter": ip}


def flux_inputs(batch=2, h=4, w=4, text=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, h * w, 4, generator=g).to(dtype), encoder_hidden_states=torch.randn(batch, text, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, 32, generator=g).to(dtype), timestep=torch.full((batch,), 0.5, dtype=dtype),
        img_ids=torch.randn(h * w, 3, generator=g), txt_ids=torch.zeros(text, 3),
    )


def sd3_inputs(batch=2, text=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g).to(dtype), encoder_hidden_states=torch.randn(batch, text, 32, generator=g).to(dtype),
                pooled_projections=torch.randn(batch, 64, generator=g).to(dtype), timestep=torch.full((batch,), 500.0, dtype=dtype))


def embeds(batch, images, dim, dtype=torch.float64, seed=5):
    return torch.randn(batch, images, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
