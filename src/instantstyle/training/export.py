"""Exports of a trained adapter, in the original IP-Adapter layout (flat ``.safetensors`` keys
``image_proj.*`` and ``ip_adapter.<id>.to_k_ip.weight`` / ``.to_v_ip.weight``):

* ``ip_adapter.safetensors``: the target layers only (``instantstyle.load_ip_adapter(pipe,
  path, target=...)`` with the training target); the file's metadata records the target.
* ``ip_adapter_diffusers.safetensors``: every cross-attention layer, as diffusers'
  ``pipe.load_ip_adapter`` expects (it raises ``KeyError`` on a partial file).  Non-target
  layers get zero K/V weights, so they add nothing; a target layer's weight (1 for presets)
  is folded into its ``to_v_ip`` (the layer's IP output is linear in V), so the file needs
  no ``set_ip_adapter_scale`` to give the same UNet output.

Image projections are renamed back from diffusers' modules to the original names, the exact
inverse of diffusers' ``_convert_ip_adapter_image_proj_to_diffusers``.
"""
from __future__ import annotations

import json
import os
import re

import torch

from ..pipelines.outputs import atomic_write_bytes
from .model import Adapter

OURS, DIFFUSERS = "ip_adapter.safetensors", "ip_adapter_diffusers.safetensors"

# diffusers' IPAdapterPlusImageProjection block names -> the original Resampler's
_PLUS_RENAMES = [
    (r"^layers\.(\d+)\.ln0\.", r"layers.\1.0.norm1."),
    (r"^layers\.(\d+)\.ln1\.", r"layers.\1.0.norm2."),
    (r"^layers\.(\d+)\.attn\.to_q\.", r"layers.\1.0.to_q."),
    (r"^layers\.(\d+)\.attn\.to_out\.0\.", r"layers.\1.0.to_out."),
    (r"^layers\.(\d+)\.ff\.0\.", r"layers.\1.1.0."),
    (r"^layers\.(\d+)\.ff\.1\.net\.0\.proj\.", r"layers.\1.1.1."),
    (r"^layers\.(\d+)\.ff\.1\.net\.2\.", r"layers.\1.1.3."),
]


def original_image_proj(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The projection's weights under the original checkpoint's names."""
    state = {k: v.detach().float().cpu() for k, v in adapter.projection.state_dict().items()}
    if adapter.format == "base":
        return {k.replace("image_embeds", "proj"): v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        kv = re.match(r"^layers\.(\d+)\.attn\.to_([kv])\.weight$", key)
        if kv:
            if kv.group(2) == "k":  # the original fuses K and V into one to_kv
                out[f"layers.{kv.group(1)}.0.to_kv.weight"] = torch.cat([value, state[key.replace("to_k", "to_v")]], 0)
            continue
        for pattern, repl in _PLUS_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _flat(image_proj: dict, ip: dict) -> dict[str, torch.Tensor]:
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in ip.items()})
    return {k: v.contiguous() for k, v in flat.items()}


def _layer(site) -> torch.nn.Module:
    return site.module.processor


def export_states(adapter: Adapter) -> dict[str, dict[str, torch.Tensor]]:
    """``{file name: flat state dict}`` for both exports."""
    image_proj = original_image_proj(adapter)
    ours, everywhere = {}, {}
    for site in adapter.sites:
        key = adapter.key_ids[site.name]
        attn = site.module
        shape = (attn.to_k.out_features, attn.to_k.in_features)
        if site.name in adapter.weights:
            proc = _layer(site)
            k = proc.to_k_ip[0].weight.detach().float().cpu()
            v = proc.to_v_ip[0].weight.detach().float().cpu()
            ours[f"{key}.to_k_ip.weight"], ours[f"{key}.to_v_ip.weight"] = k, v
            everywhere[f"{key}.to_k_ip.weight"] = k
            everywhere[f"{key}.to_v_ip.weight"] = v * adapter.weights[site.name]
        else:
            everywhere[f"{key}.to_k_ip.weight"] = torch.zeros(shape)
            everywhere[f"{key}.to_v_ip.weight"] = torch.zeros(shape)
    return {OURS: _flat(image_proj, ours), DIFFUSERS: _flat(image_proj, everywhere)}


def _metadata(adapter: Adapter, extra: dict) -> dict[str, str]:
    target = adapter.target if isinstance(adapter.target, (str, list, dict)) else str(adapter.target)
    return {"format": "pt", "instantstyle.target": json.dumps(target), "instantstyle.adapter_format": adapter.format,
            "instantstyle.num_tokens": str(adapter.num_tokens),
            **{f"instantstyle.{k}": json.dumps(v, default=str) for k, v in extra.items()}}


def write_exports(adapter: Adapter, folder: str, extra: dict | None = None) -> dict[str, str]:
    """Write both files into ``folder`` atomically; returns ``{file name: path}``."""
    from safetensors.torch import save

    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, state in export_states(adapter).items():
        path = os.path.join(folder, name)
        atomic_write_bytes(path, save(state, metadata=_metadata(adapter, extra or {})))
        paths[name] = path
    return paths
