"""Loading one part of a B-LoRA: only the style (or content) block's weights of a LoRA file.

    load_b_lora(pipe, "run/final", part="style")                  # up_blocks.0.attentions.1 only
    load_b_lora(pipe, "owner/b-lora-x", part="content", adapter_name="content")

B-LoRA (Frenkel et al., "Implicit Style-Content Separation using B-LoRA", ECCV 2024) trains
SDXL's ``up_blocks.0.attentions.0`` (content) and ``up_blocks.0.attentions.1`` (style) together;
the parts come apart at load time, so one image's style goes with another's content.  The file
is read as diffusers reads LoRAs (a local file, a folder or a hub id, ``weight_name`` default
``pytorch_lora_weights.safetensors``, ``subfolder``), its keys are filtered to the chosen
block(s) (diffusers' key names, ``unet.up_blocks.0.attentions.1...``, with or without the
``unet.`` prefix; kohya keys too, in the original SDXL block names as kohya's SDXL scripts write
them, ``lora_unet_output_blocks_1_1_...``, or in diffusers' names, ``lora_unet_up_blocks_0_attentions_1_...``),
and the rest is ``pipe.load_lora_weights`` itself (which converts kohya keys).  ``scale`` is
folded into the ``up`` (B) weights, so it touches no other adapter.
"""
from __future__ import annotations

import os
import re

from ..processors.core.validation import describe
from ..processors.targets.presets import PRESETS
from .hub import check_hub_kwargs, resolve_one

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: part -> the SDXL blocks it keeps (the registry's B-LoRA presets)
PARTS = {"style": PRESETS["sdxl"]["b-lora-style"], "content": PRESETS["sdxl"]["b-lora-content"],
         "both": PRESETS["sdxl"]["b-lora"]}
_UP_SUFFIXES = ("lora.up.weight", "lora_B.weight", "lora_up.weight")


#: kohya keys in diffusers' block names: lora_unet_up_blocks_0_attentions_1_...
_KOHYA = re.compile(r"^lora_unet_((?:down|up)_blocks)_(\d+)_attentions_(\d+)_")
#: kohya keys in the original (SGM) names, as kohya's SDXL scripts write them: SDXL's output
#: block N's attention is up_blocks[N // 3].attentions[N % 3] (3 layers per up block)
_KOHYA_SGM_UP = re.compile(r"^lora_unet_output_blocks_(\d+)_1_")
_KOHYA_OTHER = re.compile(r"^lora_unet_((?:input|output)_blocks_\d+_\d+|middle_block_\d+|mid_block_attentions_\d+)_")


def _module_path(key: str) -> str:
    """``up_blocks.0.attentions.1.<rest>`` for a diffusers key (``unet.`` prefix or not) and,
    down to the attention block, for a kohya key (the rest stays kohya's)."""
    kohya = _KOHYA.match(key)
    if kohya:
        return f"{kohya.group(1)}.{kohya.group(2)}.attentions.{kohya.group(3)}.{key[kohya.end():]}"
    sgm = _KOHYA_SGM_UP.match(key)
    if sgm:
        n = int(sgm.group(1))
        return f"up_blocks.{n // 3}.attentions.{n % 3}.{key[sgm.end():]}"
    other = _KOHYA_OTHER.match(key)
    if other:
        return f"{other.group(1)}.{key[other.end():]}"
    return key.removeprefix("unet.")


def _block(key: str) -> str:
    """``up_blocks.0.attentions.1`` for a key inside it; the first two components otherwise."""
    parts = _module_path(key).split(".")
    for i, part in enumerate(parts):
        if part == "attentions" and i + 1 < len(parts):
            return ".".join(parts[: i + 2])
    return ".".join(parts[:2])


def _in_block(key: str, block: str) -> bool:
    return _module_path(key).startswith(block + ".")


def read_lora(source, subfolder: str | None = None, weight_name: str | None = None, **hub_kwargs):
    """``(state dict, name for messages)`` of a LoRA file: a dict, a local file or folder, or a hub id."""
    import torch

    if isinstance(source, dict):
        return dict(source), "state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path_or_dict: expected a path, a hub id or a state dict, "
                        f"got {describe(source)}")
    name = os.path.expanduser(os.fspath(source))
    if os.path.isfile(name) and not subfolder and not weight_name:
        path = name
    else:
        path = resolve_one(name, subfolder, weight_name or WEIGHT_NAME, **check_hub_kwargs(hub_kwargs))
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu"), path
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a LoRA state dict, got {describe(state)}")
    return state, path


def select_part(state: dict, part: str, source: str = "state dict") -> dict:
    """The keys of ``state`` inside the blocks of ``part``; one-line errors otherwise."""
    if part not in PARTS:
        raise ValueError(f"part: expected one of {', '.join(PARTS)}, got {part!r}")
    unet_keys = [k for k in state if not k.startswith(("text_encoder", "te_", "te1", "te2", "lora_te"))]
    kept = {k: state[k] for k in unet_keys if any(_in_block(k, b) for b in PARTS[part])}
    missing = [b for b in PARTS[part] if not any(_in_block(k, b) for k in kept)]
    if missing:
        blocks = sorted({_block(k) for k in unet_keys})
        raise ValueError(f"{source}: no LoRA weights in {' / '.join(missing)} (part={part!r}); the file has LoRA "
                         f"weights in: {', '.join(blocks) or 'no UNet block'}")
    return kept


def load_b_lora(pipe, pretrained_model_name_or_path_or_dict, part: str = "style", weight_name: str | None = None,
                subfolder: str | None = None, adapter_name: str | None = None, scale: float = 1.0,
                **hub_kwargs) -> dict[str, object]:
    """Load only ``part`` (``"style"``: ``up_blocks.0.attentions.1``, ``"content"``:
    ``up_blocks.0.attentions.0``, ``"both"``) of a B-LoRA file into ``pipe`` through diffusers'
    ``pipe.load_lora_weights``; returns the state dict that was loaded.  Everything is checked
    before the pipeline changes."""
    import torch

    if not hasattr(pipe, "load_lora_weights") or getattr(pipe, "unet", None) is None:
        raise TypeError(f"pipe: expected a diffusers UNet pipeline with LoRA support (SDXL), got {describe(pipe)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a number, got {describe(scale)}")
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name: expected a string or None, got {describe(adapter_name)}")
    if part not in PARTS:
        raise ValueError(f"part: expected one of {', '.join(PARTS)}, got {part!r}")
    state, source = read_lora(pretrained_model_name_or_path_or_dict, subfolder, weight_name, **hub_kwargs)
    kept = select_part(state, part, source)
    if scale != 1.0:  # the layer's output is linear in B: scaling it scales this LoRA only
        kept = {k: (v * scale if k.endswith(_UP_SUFFIXES) and isinstance(v, torch.Tensor) else v)
                for k, v in kept.items()}
    pipe.load_lora_weights(kept, adapter_name=adapter_name)
    return kept
