"""Flux IP-Adapter checkpoints -> fused processors in the target layers only.

Two layouts, both ``{"image_proj": {...}, "ip_adapter": {"<id>.<param>": ...}}`` once read:

- XLabs (diffusers' converter layout): ids 0..18 over the double-stream blocks,
  ``to_k_ip``/``to_v_ip`` weight AND bias; ``image_proj`` ``proj.*``/``norm.*``
  (diffusers' ``ImageProjection``, CLIP ViT-L 768-d embeds).  XLabs' own safetensors
  (``double_blocks.N.processor.ip_adapter_double_stream_k_proj.*``,
  ``ip_adapter_proj_model.*``) is converted as diffusers' ``FluxIPAdapterMixin`` does.
- InstantX FLUX.1-dev (layout read from Shakker-Labs' ComfyUI-IPAdapter-Flux:
  ``ModuleList(57 processors).load_state_dict(state["ip_adapter"])``): ids 0..18 the
  double-stream, 19..56 the single-stream blocks, bias-free ``to_k_ip``/``to_v_ip``
  (the RMSNorms have no weights); ``image_proj`` an MLP ``proj.0``/``proj.2`` plus
  LayerNorm ``norm`` from SigLIP's 1152-d pooled output to 128 tokens.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch

from ..processors.dit.flux import (
    FusedFluxInstantXAttnProcessor,
    FusedFluxIPAdapterAttnProcessor,
)
from .checkpoints import read_checkpoint
from .report import scaled_weight

XLABS, INSTANTX = "xlabs", "instantx"


class InstantXImageProjection(torch.nn.Module):
    """InstantX's image projection: pooled SigLIP embeds ``(B, D)`` -> ``(B, tokens, C)``."""

    def __init__(self, embed_dim: int = 1152, cross_attention_dim: int = 4096, num_tokens: int = 128):
        super().__init__()
        self.cross_attention_dim, self.num_tokens = cross_attention_dim, num_tokens
        self.proj = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, embed_dim * 2), torch.nn.GELU(), torch.nn.Linear(embed_dim * 2, cross_attention_dim * num_tokens)
        )
        self.norm = torch.nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(x)


def _from_xlabs_file(flat: dict) -> dict:
    """XLabs' original safetensors keys -> diffusers' converter layout (as diffusers)."""
    state = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        rest = ".".join(key.split(".")[1:])
        if key.startswith(("ip_adapter_proj_model.", "image_proj.")):
            state["image_proj"][rest] = value
        elif key.startswith(("double_blocks.", "ip_adapter.")):
            rest = rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip").replace("ip_adapter_double_stream_v_proj", "to_v_ip")
            state["ip_adapter"][rest.replace("processor.", "")] = value
    return state


def read_flux_checkpoint(checkpoint) -> Tuple[dict, str]:
    if isinstance(checkpoint, (str, os.PathLike)) and os.fspath(checkpoint).endswith(".safetensors") and os.path.isfile(checkpoint):
        from safetensors import safe_open

        with safe_open(os.fspath(checkpoint), framework="pt", device="cpu") as f:
            if any(k.startswith("double_blocks.") for k in f.keys()):
                return _from_xlabs_file({k: f.get_tensor(k) for k in f.keys()}), os.fspath(checkpoint)
    return read_checkpoint(checkpoint)


def checkpoint_format(state: dict, source: str) -> str:
    ip, proj = state["ip_adapter"], state["image_proj"]
    if any(k.endswith(".to_k_ip.bias") for k in ip) and "proj.weight" in proj:
        return XLABS
    if "proj.0.weight" in proj and not any(k.endswith(".bias") for k in ip):
        return INSTANTX
    raise ValueError(
        f"{source}: not a Flux IP-Adapter checkpoint: expected XLabs (image_proj.proj.weight, biased to_k_ip) or "
        f"InstantX (image_proj.proj.0.weight, bias-free to_k_ip), got image_proj keys {sorted(proj)[:4]}"
    )


def _ids(state: dict) -> list:
    return sorted({int(k.split(".")[0]) for k in state["ip_adapter"] if k.split(".")[0].isdigit()})


def layer_params(fmt: str, model) -> int:
    """IP K/V parameters one adapter adds to a layer (every Flux layer has the same)."""
    inner, joint_dim = model.inner_dim, model.config.joint_attention_dim
    return 2 * (joint_dim * inner + (inner if fmt == XLABS else 0))


def capable_sites(fmt: str, sites) -> list:
    """The layers a checkpoint of ``fmt`` has weights for, in checkpoint id order."""
    return [s for s in sites if s.kind == "joint"] if fmt == XLABS else list(sites)


def plan(model, states: List[Tuple[dict, str]], fmt: str, sites, weights: List[Dict[str, object]], scales, gates):
    """Processors for every capable layer, built and loaded before the model is touched.
    Returns ``(processors {site: proc}, image projections, held params, all-layer params)``."""
    joint_dim = model.config.joint_attention_dim
    inner = model.inner_dim
    capable = capable_sites(fmt, sites)
    expected = list(range(len(capable)))
    for state, source in states:
        found = _ids(state)
        if found != expected:
            raise ValueError(
                f"{source}: holds IP layers {found[:1]}..{found[-1:]} ({len(found)}), this Flux transformer has "
                f"{len(capable)} {'double-stream' if fmt == XLABS else 'double+single-stream'} layers for a {fmt} checkpoint "
                "(ids 0..%d); is it for another model?" % (len(capable) - 1)
            )
    n = len(states)
    tokens = [_tokens(fmt, state, joint_dim) for state, _ in states]
    procs, held_params = {}, 0
    for key_id, site in enumerate(capable):
        held = [a for a in range(n) if site.name in weights[a]]
        scale = [scaled_weight(scales[a], weights[a][site.name]) if a in held else 0.0 for a in range(n)]
        if fmt == XLABS:
            proc = FusedFluxIPAdapterAttnProcessor(inner, joint_dim, tokens, scale, adapter_ids=held)
        else:
            proc = FusedFluxInstantXAttnProcessor(inner, joint_dim, tokens, scale, adapter_ids=held, head_dim=site.module.head_dim)
        values = {}
        for j, a in enumerate(held):
            state, source = states[a]
            for part in ("to_k_ip", "to_v_ip"):
                for p in ("weight", "bias") if fmt == XLABS else ("weight",):
                    key = f"{key_id}.{part}.{p}"
                    if key not in state["ip_adapter"]:
                        raise ValueError(f"{source}: missing key 'ip_adapter.{key}' (layer {site.path})")
                    got, want = tuple(state["ip_adapter"][key].shape), ((inner, joint_dim) if p == "weight" else (inner,))
                    if got != want:
                        raise ValueError(f"{source}: key 'ip_adapter.{key}': expected shape {want}, got {got}")
                    values[f"{part}.{j}.{p}"] = state["ip_adapter"][key]
        proc.load_state_dict(values, strict=True)
        proc.to(device=site.module.to_q.weight.device, dtype=site.module.to_q.weight.dtype)
        proc.gates = list(gates)
        procs[site.name] = proc
        held_params += len(held) * layer_params(fmt, model)
    projections = []
    for state, source in states:
        try:
            if fmt == XLABS:
                projections.append(model._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False))
            else:
                proj = state["image_proj"]
                module = InstantXImageProjection(proj["proj.0.weight"].shape[1], joint_dim, _tokens(fmt, state, joint_dim))
                module.load_state_dict(proj, strict=True)
                projections.append(module)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"{source}: image_proj does not fit a {fmt} image projection: {str(exc).splitlines()[0]}") from exc
    all_params = n * len(capable) * layer_params(fmt, model)
    return procs, projections, held_params, all_params, tokens


def _tokens(fmt: str, state: dict, joint_dim: int) -> int:
    proj = state["image_proj"]
    weight = proj["proj.weight"] if fmt == XLABS else proj["proj.2.weight"]
    return int(weight.shape[0] // joint_dim)
