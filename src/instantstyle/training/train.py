"""``train_adapter``: one call from a model folder and a data set to exported adapter files.

Load the pipeline and image encoder (frozen) and install a new adapter (``model``); the
shared engine (``engine``) then reads the data (``data``), runs optimiser steps (``loop``)
under accelerate, writes checkpoints (``checkpoints``), metrics and validation grids
(``report``), and at the end the exports (``export``) and the loss plot.  Works as one
process and under ``accelerate launch`` / ``torchrun`` (DDP; DeepSpeed ZeRO-2 through an
accelerate config, see ``deepspeed_zero2.yaml``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from ..pipelines.errors import UserError
from .engine import FIXED_SETTINGS as SHARED_FIXED_SETTINGS
from .engine import Parts, load_pipeline, run_training

#: settings a resumed run must share with its checkpoint
FIXED_SETTINGS = SHARED_FIXED_SETTINGS + ("format",)


def _check(settings: dict) -> None:
    if settings["format"] not in ("base", "plus"):
        raise UserError(f"--format: expected base or plus, got {settings['format']!r}")
    if settings["validation_every"] and not (settings["validation_prompts"] and settings["validation_images"]):
        raise UserError("--validation-every: needs --validation-prompts and --validation-images")


def _load_models(model: str, image_encoder: str | None, weight_dtype, hub: dict):
    from ..loaders.hub import load_image_processor, load_pretrained_encoder

    pipe = load_pipeline(model, weight_dtype, hub)
    encoder_name = image_encoder or (os.path.join(model, "image_encoder") if os.path.isdir(model) else None)
    if encoder_name is None:
        raise UserError("--image-encoder: required (a CLIP vision model with projection, e.g. h94/IP-Adapter's "
                        "sdxl_models/image_encoder)")
    try:
        encoder = load_pretrained_encoder(encoder_name, None, dtype=weight_dtype, **hub)
    except (OSError, ValueError) as exc:
        raise UserError(f"--image-encoder: {exc}") from None
    return pipe, encoder, load_image_processor(encoder_name, None, encoder, **hub)


def train_adapter(model: str, data: str, out: str, *, image_encoder: str | None = None, target="style",
                  format: str = "base", resolution: int = 1024, batch_size: int = 8, lr: float = 1e-4,
                  weight_decay: float = 0.01, lr_warmup_steps: int = 0, max_steps: int = 1000,
                  checkpoint_every: int = 500, keep_checkpoints: int = 3, resume: str | None = None, seed: int = 0,
                  mixed_precision: str = "no", gradient_checkpointing: bool = False, gradient_accumulation: int = 1,
                  device: str | None = None, noise_offset: float = 0.0, drop_image: float = 0.05,
                  drop_text: float = 0.05, drop_both: float = 0.05, max_grad_norm: float | None = None,
                  validation_every: int = 0, validation_prompts: Sequence[str] = (),
                  validation_images: Sequence[str] = (), validation_inference_steps: int = 20,
                  validation_guidance: float = 5.0, progress: bool = True, hub: dict | None = None) -> dict:
    """Train an IP-Adapter whose image features go only into ``target`` (default InstantStyle's
    ``style`` block); returns ``{"step", "loss", "exports": {name: path}, "out"}`` (rank 0; other
    ranks get the same minus the exports).

    ``batch_size`` is the global batch: split over processes and ``gradient_accumulation``
    micro-batches, which must divide it.  ``resume``: ``"latest"`` (start fresh when ``out``
    has no checkpoint yet) or a checkpoint folder.  See ``instantstyle train-adapter --help``.
    """
    settings = {k: v for k, v in locals().items() if k not in ("hub", "progress")}
    settings["validation_prompts"], settings["validation_images"] = list(validation_prompts), list(validation_images)

    def setup(weight_dtype) -> Parts:
        from .export import write_exports
        from .loop import Conditioner
        from .model import install_adapter

        pipe, encoder, processor = _load_models(model, image_encoder, weight_dtype, hub or {})
        try:
            adapter = install_adapter(pipe.unet, target, format, encoder.config, seed=seed)
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"--target / --format: {exc}") from None
        return Parts(
            pipe=pipe, frozen=[encoder],
            conditioner=lambda device: Conditioner(pipe, encoder, processor, format, device, weight_dtype),
            export=lambda folder, extra: write_exports(adapter, folder, extra),
            summary=lambda exports: (f"{exports['ip_adapter.safetensors']} (load with instantstyle.load_ip_adapter("
                                     f"pipe, path, target={target!r})) and {exports['ip_adapter_diffusers.safetensors']} "
                                     "(diffusers' pipe.load_ip_adapter)"))

    return run_training("train-adapter", settings, setup, fixed=FIXED_SETTINGS, check=_check, hub=hub,
                        progress=progress)
