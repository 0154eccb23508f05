"""Reading IP-Adapter checkpoints in the original layout.

``{"image_proj": {...}, "ip_adapter": {"<id>.to_k_ip.weight", "<id>.to_v_ip.weight"}}``
in a ``.bin``; flat ``image_proj.*`` / ``ip_adapter.*`` keys in a ``.safetensors``.
Every error names the file.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

from ..processors.core.validation import describe

_PARTS = ("image_proj", "ip_adapter")


def _unflatten(flat: dict) -> dict:
    nested = {part: {} for part in _PARTS}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if part in nested and rest:
            nested[part][rest] = value
    return nested


def read_checkpoint(checkpoint) -> Tuple[dict, str]:
    """``(state dict with 'image_proj' and 'ip_adapter', a name for messages)``."""
    if isinstance(checkpoint, dict):
        source = "state dict"
        state = checkpoint if all(p in checkpoint for p in _PARTS) else _unflatten(checkpoint)
    elif isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"checkpoint: no such file {source!r}")
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = _unflatten(load_file(source, device="cpu"))
        else:
            state = torch.load(source, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and not all(p in state for p in _PARTS):
                state = _unflatten(state)
    else:
        raise TypeError(f"checkpoint: expected a path to a .bin/.safetensors file or a state dict, got {describe(checkpoint)}")
    if not isinstance(state, dict) or not all(isinstance(state.get(p), dict) and state[p] for p in _PARTS):
        raise ValueError(f"{source}: expected the IP-Adapter layout with non-empty 'image_proj' and 'ip_adapter' parts")
    if any("lora" in k for k in state["ip_adapter"]):
        raise NotImplementedError(f"{source}: IP-Adapter FaceID LoRA weights are not supported; use diffusers' load_ip_adapter")
    return state, source


def num_image_tokens(image_proj: dict) -> int:
    """Tokens per image, by the same rules as diffusers' loader (base 4, Plus 16, Full-face 257)."""
    if "proj.weight" in image_proj:
        return 4  # IP-Adapter
    if "proj.3.weight" in image_proj:
        return 257  # Full face: 256 CLIP tokens + CLS
    if "perceiver_resampler.proj_in.weight" in image_proj or "norm.weight" in image_proj:
        return 4  # FaceID (Plus)
    return int(image_proj["latents"].shape[1])  # Plus


def layer_weights(state: dict, source: str, key_id: int, shape: tuple) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(to_k_ip, to_v_ip)`` weights of layer ``key_id``, checked against ``shape``."""
    out = []
    for proj in ("to_k_ip", "to_v_ip"):
        key = f"{key_id}.{proj}.weight"
        if key not in state["ip_adapter"]:
            raise KeyError(f"{source}: missing key 'ip_adapter.{key}' (expected for this UNet's layer {key_id})")
        w = state["ip_adapter"][key]
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"{source}: key 'ip_adapter.{key}': expected shape {tuple(shape)}, got {tuple(w.shape)}")
        out.append(w)
    return out[0], out[1]


def layer_ids(state: dict) -> list:
    """Sorted ids of the IP layers a checkpoint holds."""
    return sorted({int(k.split(".")[0]) for k in state["ip_adapter"] if k.endswith("to_k_ip.weight")})


def image_embed_width(image_proj: dict):
    """``(what the projection reads, its width)``: IP-Adapter's projection reads the image
    encoder's projected ``image_embeds``; Plus and Full-face read its penultimate hidden
    states.  None for FaceID (insightface embeddings, no CLIP encoder involved)."""
    # same order as num_image_tokens: base and Full-face also have norm keys, FaceID has no proj.3
    if "proj.weight" in image_proj:
        return "projection_dim", int(image_proj["proj.weight"].shape[1])
    if "proj.3.weight" in image_proj:
        return "hidden_size", int(image_proj["proj.0.weight"].shape[1])
    if "perceiver_resampler.proj_in.weight" in image_proj or "norm.weight" in image_proj:
        return None
    if "proj_in.weight" in image_proj:
        return "hidden_size", int(image_proj["proj_in.weight"].shape[1])
    return None


def check_encoder_width(encoder, states) -> None:
    """Each adapter's image projection against the image encoder that will feed it: a
    one-line error naming the width that fits, instead of a shape error at generate time."""
    config = getattr(encoder, "config", None)
    if config is None:
        return
    for state, source in states:
        wanted = image_embed_width(state["image_proj"])
        if wanted is None:
            continue
        field, width = wanted
        got = getattr(config, field, None)
        if got is not None and got != width:
            kind = "image_embeds (projection_dim)" if field == "projection_dim" else "penultimate hidden states (hidden_size)"
            raise ValueError(f"image_encoder: {source} reads the encoder's {kind} of width {width}, got an encoder "
                             f"({type(encoder).__name__}) with {field}={got}; use an image encoder with {field}={width}")
