"""SD3.5 IP-Adapter checkpoints (InstantX SD3.5-Large) -> fused processors in the target
joint blocks only.

Layout (diffusers' ``SD3Transformer2DLoadersMixin``): ``ip_adapter`` keys
``<block>.{norm_ip.linear.weight,norm_ip.linear.bias,to_k_ip.weight,to_v_ip.weight,
norm_q.weight,norm_k.weight,norm_ip_k.weight}`` for every joint block; ``image_proj`` an
``IPAdapterTimeImageProjection`` (converted by diffusers' own converter).  Blocks outside
the target keep their plain ``JointAttnProcessor2_0`` (it ignores the IP kwargs), so
diffusers' ``set_ip_adapter_scale`` and ``is_ip_adapter_active`` see only the targets.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from ..processors.dit.sd3 import FusedSD3IPAdapterJointAttnProcessor

PARAMS = ("norm_ip.linear.weight", "norm_ip.linear.bias", "to_k_ip.weight", "to_v_ip.weight", "norm_q.weight", "norm_k.weight", "norm_ip_k.weight")


def is_sd3_checkpoint(state: dict) -> bool:
    return any(k.endswith(".norm_ip.linear.weight") for k in state["ip_adapter"])


def _layers(state: dict) -> Dict[int, dict]:
    layers: Dict[int, dict] = {}
    for key, value in state["ip_adapter"].items():
        idx, _, name = key.partition(".")
        if idx.isdigit():
            layers.setdefault(int(idx), {})[name] = value
    return layers


def plan(model, states: List[Tuple[dict, str]], sites, weights: List[Dict[str, object]], scales):
    """``(processors {site: proc}, image projection, held params, all-layer params)``;
    everything is built and loaded before the model is touched."""
    if len(states) != 1:
        raise ValueError(f"checkpoint: expected one SD3 IP-Adapter (diffusers' SD3 pipelines take one), got {len(states)}")
    (state, source), weight, scale = states[0], weights[0], scales[0]
    if isinstance(scale, list):
        raise ValueError(f"scale: expected one number for an SD3 IP-Adapter, got per-image list {scale}")
    layers = _layers(state)
    if sorted(layers) != list(range(len(sites))):
        found = sorted(layers)
        raise ValueError(
            f"{source}: holds IP layers {found[:1]}..{found[-1:]} ({len(found)}), this SD3 transformer has "
            f"{len(sites)} joint blocks (ids 0..{len(sites) - 1}); is it for another model (SD3.5-Large has 38)?"
        )
    cfg = model.config
    hidden = cfg.attention_head_dim * cfg.num_attention_heads
    procs, held = {}, 0
    per_layer = sum(v.numel() for v in layers[0].values())  # what diffusers holds in every block
    for idx, site in enumerate(sites):
        values = layers[idx]
        missing = [p for p in PARAMS if p not in values]
        if missing:
            raise ValueError(f"{source}: missing key 'ip_adapter.{idx}.{missing[0]}' (layer {site.path})")
        if site.name not in weight:
            continue
        temb_dim = values["norm_ip.linear.weight"].shape[1]
        proc = FusedSD3IPAdapterJointAttnProcessor(hidden, hidden, cfg.attention_head_dim, temb_dim, 1.0)
        try:
            proc.load_state_dict(values, strict=True)
        except RuntimeError as exc:
            detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line or "Unexpected" in line), str(exc))
            raise ValueError(f"{source}: layer {idx} does not fit this transformer: {detail}") from exc
        proc.scale = scale * weight[site.name]
        proc.to(device=site.module.to_q.weight.device, dtype=site.module.to_q.weight.dtype)
        procs[site.name] = proc
        held += per_layer
    try:
        projection = model._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ValueError(f"{source}: image_proj does not fit diffusers' IPAdapterTimeImageProjection: {str(exc).splitlines()[0]}") from exc
    return procs, projection, held, per_layer * len(sites)


def num_tokens(state: dict) -> int:
    latents = state["image_proj"].get("latents")
    return int(latents.shape[1]) if latents is not None else 0
