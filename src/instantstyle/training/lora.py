"""LoRA on registry targets, through peft and diffusers (no LoRA layers of our own).

* **Where**: the attention layers (self and cross) the target resolves to in the block
  registry (``b-lora-style`` = SDXL's ``up_blocks.0.attentions.1``), and in each of them
  ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``, as B-LoRA trains them.
* **How**: ``peft.LoraConfig`` (Gaussian A, zero B: the UNet starts unchanged) added with
  diffusers' own ``unet.add_adapter``; the frozen UNet stays as it was, the LoRA weights
  are float32 (mixed precision autocasts).
* **Export**: ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format, written by the
  pipeline class's own ``save_lora_weights`` (keys ``unet.<module>.lora.down/up.weight``).
  ``lora_alpha / rank`` is folded into the ``up`` weights, so the file needs no alpha
  metadata: every reader (``pipe.load_lora_weights``, ``instantstyle.load_b_lora``, a
  filtered dict) gives the trained UNet's output.
"""
from __future__ import annotations

import os
import shutil

import torch

from ..processors.targets.registry import registry_of

#: B-LoRA's projections in every targeted attention layer
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "default"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MISSING_PEFT = 'train-lora needs peft: pip install "instantstyle[train]"'


def require_peft() -> None:
    """A one-line ImportError naming the extra when peft is missing."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError(MISSING_PEFT) from None


def lora_modules(unet, target) -> list[str]:
    """The Linear modules a target's LoRA goes into, in site order."""
    registry = registry_of(unet)
    weights = registry.resolve(target, "any")
    odd = {name: w for name, w in weights.items() if w != 1.0}
    if odd:
        name, w = next(iter(odd.items()))
        raise ValueError(f"target: {name} has weight {w!r}; a LoRA target takes whole layers (weight 1), "
                         "scale a LoRA when loading it")
    modules = dict(unet.named_modules())
    found = []
    for site in registry.sites:
        if site.name in weights:
            found += [f"{site.path}.{p}" for p in PROJECTIONS if isinstance(modules.get(f"{site.path}.{p}"),
                                                                            torch.nn.Linear)]
    if not found:
        raise ValueError(f"target: {target!r} selects no attention projection of this UNet")
    return found


def install_lora(unet, target, rank: int = 4, alpha: float | None = None, seed: int = 0) -> list[str]:
    """Freeze ``unet`` and add a new trainable LoRA (``rank``, ``alpha`` default ``rank``) on the
    target's projections; returns the module names.  The new weights depend only on ``seed``."""
    require_peft()
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"lora_alpha: expected a positive number, got {alpha}")
    modules = lora_modules(unet, target)
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=modules),
                         adapter_name=ADAPTER)
    for param in unet.parameters():
        if param.requires_grad:  # float32 weights under mixed precision (the frozen UNet may be half)
            param.data = param.data.float()
    return modules


def lora_state(unet) -> dict[str, torch.Tensor]:
    """The trained LoRA in diffusers' key names (``<module>.lora.down/up.weight``), scale folded in."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    config = unet.peft_config[ADAPTER]
    scale = config.lora_alpha / config.r
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    return {k: (v * scale if k.endswith("lora.up.weight") else v).detach().float().cpu().contiguous()
            for k, v in state.items()}


def write_lora(pipe, folder: str, metadata: dict | None = None) -> dict[str, str]:
    """``folder/pytorch_lora_weights.safetensors`` through the pipeline's own ``save_lora_weights``,
    written next to it and renamed into place (a kill leaves the old file or the new one)."""
    import json

    from ..pipelines.outputs import TEMP_PREFIX

    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TEMP_PREFIX}lora")
    shutil.rmtree(tmp, ignore_errors=True)
    type(pipe).save_lora_weights(tmp, unet_lora_layers=lora_state(pipe.unet), weight_name=WEIGHT_NAME)
    path = os.path.join(folder, WEIGHT_NAME)
    os.replace(os.path.join(tmp, WEIGHT_NAME), path)
    shutil.rmtree(tmp, ignore_errors=True)
    if metadata:
        from ..pipelines.outputs import atomic_write_bytes

        atomic_write_bytes(os.path.join(folder, "training.json"), json.dumps(metadata, indent=1, default=str).encode())
    return {WEIGHT_NAME: path}
