"""``train_adapter``: one call from a model folder and a data set to exported adapter files.

Load the pipeline and image encoder (frozen), install a new adapter (``model``), read the
data (``data``), then run optimiser steps (``loop``) under accelerate, writing checkpoints
(``checkpoints``), metrics and validation grids (``report``), and at the end the exports
(``export``) and the loss plot.  Works as one process and under ``accelerate launch`` /
``torchrun`` (DDP; DeepSpeed ZeRO-2 through an accelerate config, see ``deepspeed_zero2.yaml``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, Sequence

from ..pipelines.errors import UserError

MIXED_PRECISION = ("no", "fp16", "bf16")
#: settings a resumed run must share with its checkpoint (the process count and the
#: accumulation split may change: the global batch and its samples stay the same)
FIXED_SETTINGS = ("target", "format", "resolution", "batch_size", "seed", "lr", "weight_decay", "lr_warmup_steps",
                  "noise_offset", "drop_image", "drop_text", "drop_both")


def _check(settings: dict, world: int) -> None:
    def positive(name, allow_zero=False):
        value = settings[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
            raise UserError(f"{name.replace('_', '-')}: expected a {'non-negative' if allow_zero else 'positive'} "
                            f"integer, got {value!r}")

    for name in ("resolution", "batch_size", "max_steps", "gradient_accumulation", "keep_checkpoints"):
        positive(name)
    for name in ("checkpoint_every", "validation_every", "lr_warmup_steps", "validation_inference_steps"):
        positive(name, allow_zero=True)
    if settings["format"] not in ("base", "plus"):
        raise UserError(f"--format: expected base or plus, got {settings['format']!r}")
    if settings["mixed_precision"] not in MIXED_PRECISION:
        raise UserError(f"--mixed-precision: expected one of {', '.join(MIXED_PRECISION)}, got {settings['mixed_precision']!r}")
    if not settings["lr"] > 0:
        raise UserError(f"--lr: expected a positive number, got {settings['lr']}")
    if settings["resolution"] % 8:
        raise UserError(f"--resolution: expected a multiple of 8, got {settings['resolution']}")
    split = world * settings["gradient_accumulation"]
    if settings["batch_size"] % split:
        raise UserError(f"--batch-size {settings['batch_size']} (the global batch) must be a multiple of processes x "
                        f"--gradient-accumulation = {world} x {settings['gradient_accumulation']} = {split}")
    if settings["validation_every"] and not (settings["validation_prompts"] and settings["validation_images"]):
        raise UserError("--validation-every: needs --validation-prompts and --validation-images")


def _load_models(model: str, image_encoder: Optional[str], weight_dtype, hub: dict):
    import torch
    from diffusers import DiffusionPipeline

    from ..loaders.hub import load_image_processor, load_pretrained_encoder
    from ..pipelines.loading import from_pretrained

    dtype = {} if weight_dtype == torch.float32 else {"torch_dtype": weight_dtype}
    pipe = from_pretrained("--model", DiffusionPipeline.from_pretrained, model, **dtype, **hub)
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise UserError(f"--model: {model!r} is a {type(pipe).__name__}; training takes a UNet pipeline (SDXL, SD1.5)")
    encoder_name = image_encoder or (os.path.join(model, "image_encoder") if os.path.isdir(model) else None)
    if encoder_name is None:
        raise UserError("--image-encoder: required (a CLIP vision model with projection, e.g. h94/IP-Adapter's "
                        "sdxl_models/image_encoder)")
    try:
        encoder = load_pretrained_encoder(encoder_name, None, dtype=weight_dtype, **hub)
    except (OSError, ValueError) as exc:
        raise UserError(f"--image-encoder: {exc}") from None
    return pipe, encoder, load_image_processor(encoder_name, None, encoder, **hub)


def train_adapter(model: str, data: str, out: str, *, image_encoder: Optional[str] = None, target="style",
                  format: str = "base", resolution: int = 1024, batch_size: int = 8, lr: float = 1e-4,
                  weight_decay: float = 0.01, lr_warmup_steps: int = 0, max_steps: int = 1000,
                  checkpoint_every: int = 500, keep_checkpoints: int = 3, resume: Optional[str] = None, seed: int = 0,
                  mixed_precision: str = "no", gradient_checkpointing: bool = False, gradient_accumulation: int = 1,
                  device: Optional[str] = None, noise_offset: float = 0.0, drop_image: float = 0.05,
                  drop_text: float = 0.05, drop_both: float = 0.05, max_grad_norm: Optional[float] = None,
                  validation_every: int = 0, validation_prompts: Sequence[str] = (),
                  validation_images: Sequence[str] = (), validation_inference_steps: int = 20,
                  validation_guidance: float = 5.0, progress: bool = True, hub: Optional[dict] = None) -> dict:
    """Train an IP-Adapter whose image features go only into ``target`` (default InstantStyle's
    ``style`` block); returns ``{"step", "loss", "exports": {name: path}, "out"}`` (rank 0; other
    ranks get the same minus the exports).

    ``batch_size`` is the global batch: split over processes and ``gradient_accumulation``
    micro-batches, which must divide it.  ``resume``: ``"latest"`` (start fresh when ``out``
    has no checkpoint yet) or a checkpoint folder.  See ``instantstyle train-adapter --help``.
    """
    settings = {k: v for k, v in locals().items() if k not in ("hub", "progress")}
    settings["validation_prompts"], settings["validation_images"] = list(validation_prompts), list(validation_images)
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    from . import checkpoints as ckpt
    from .data import Loader, read_dataset
    from .export import write_exports
    from .loop import Conditioner, Drops, train_step
    from .model import install_adapter, trainable_parameters
    from .report import MetricsWriter, plot_loss, reset_metrics, validation_grid

    if mixed_precision not in MIXED_PRECISION:
        raise UserError(f"--mixed-precision: expected one of {', '.join(MIXED_PRECISION)}, got {mixed_precision!r}")
    cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation, cpu=cpu)
    world, main = accelerator.num_processes, accelerator.is_main_process
    _check(settings, world)
    drops = Drops(drop_image, drop_text, drop_both)
    try:
        drops.check()
    except ValueError as exc:
        raise UserError(f"--drop-*: {exc}") from None
    out = os.path.abspath(out)
    if main:
        from ..pipelines.outputs import writable_folder

        writable_folder(out, "--out")
        ckpt.remove_temporaries(out)
    accelerator.wait_for_everyone()
    try:
        dataset = read_dataset(data)
    except (OSError, ValueError) as exc:
        raise UserError(f"--data: {exc}") from None
    if not len(dataset):
        raise UserError(f"--data: no usable rows in {data!r}" + (f"; {dataset.warning}" if dataset.warning else ""))
    if dataset.warning and main:
        print(f"instantstyle: warning: {dataset.warning}", file=sys.stderr)
    try:
        resume_path = ckpt.resolve_resume(out, resume)
    except ValueError as exc:
        raise UserError(str(exc)) from None

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    pipe, encoder, processor = _load_models(model, image_encoder, weight_dtype, hub or {})
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; it only encodes, once per sample
    unet = pipe.unet
    try:
        adapter = install_adapter(unet, target, format, encoder.config, seed=seed)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"--target / --format: {exc}") from None
    for module in (pipe.vae, encoder, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.to(accelerator.device)
    encoder.to(accelerator.device)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [p for _, p in trainable_parameters(unet)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / lr_warmup_steps) if lr_warmup_steps else 1.0)
    # the LR schedule is stepped by hand, once per optimiser step (accelerate's wrapper steps
    # it once per process, which would tie the schedule to the process count)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # DeepSpeed wants the micro-batch, which it would read from a prepared DataLoader
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size // (world * gradient_accumulation)
    model_prepared, optimizer = accelerator.prepare(unet, optimizer)

    start, elapsed = 0, 0.0
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, unet, optimizer, lr_scheduler, accelerator)
        changed = [k for k in FIXED_SETTINGS if json.dumps(state["settings"].get(k), default=str)
                   != json.dumps(settings.get(k), default=str)]
        if changed:
            k = changed[0]
            raise UserError(f"--resume: {resume_path} was trained with {k}={state['settings'].get(k)!r}, this run has "
                            f"{settings.get(k)!r}; resume with the same settings or start a new --out")
        start, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
    if main:
        reset_metrics(out, start)
    accelerator.wait_for_everyone()

    conditioner = Conditioner(pipe, encoder, processor, format, accelerator.device, weight_dtype)
    warn = (lambda m: print(f"instantstyle: warning: {m}", file=sys.stderr)) if main else (lambda m: None)
    load = Loader(dataset, resolution, seed, warn)
    metrics = MetricsWriter(out) if main else None
    loss, began = float("nan"), time.perf_counter() - elapsed

    def checkpoint(step: int) -> None:
        ckpt.save_checkpoint(out, step, unet, optimizer, lr_scheduler, accelerator,
                             {"settings": settings, "samples": step * batch_size, "elapsed": time.perf_counter() - began,
                              "processes": world}, keep_checkpoints)

    def validate(step: int) -> None:
        if main:
            was_training = unet.training
            unet.eval()
            with accelerator.autocast():
                validation_grid(pipe, conditioner, list(validation_images), list(validation_prompts), resolution,
                                validation_inference_steps, validation_guidance, seed,
                                os.path.join(out, "validation", f"step-{step:06d}.png"))
            unet.train(was_training)
        accelerator.wait_for_everyone()

    bar = tqdm(total=max_steps, initial=start, desc="train-adapter", unit="step", file=sys.stderr,
               disable=not (main and progress), dynamic_ncols=True)
    try:
        for step in range(start, max_steps):
            loss = train_step(step, model_prepared, accelerator, optimizer, lr_scheduler, conditioner, noise_scheduler,
                              load, seed=seed, global_batch=batch_size, accumulation=gradient_accumulation, drops=drops,
                              noise_offset=noise_offset, resolution=resolution, max_grad_norm=max_grad_norm)
            done = step + 1
            current_lr = optimizer.param_groups[0]["lr"]
            if metrics is not None:
                metrics.write(done, loss, current_lr, time.perf_counter() - began)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{current_lr:.2e}")
            if checkpoint_every and done % checkpoint_every == 0:
                checkpoint(done)
            if validation_every and (done % validation_every == 0 or done == max_steps):
                validate(done)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    result = {"step": max_steps, "loss": loss, "out": out, "exports": {}}
    accelerator.wait_for_everyone()
    if main:
        result["exports"] = write_exports(adapter, os.path.join(out, "final"),
                                          {"model": model, "steps": max_steps, "seed": seed, "resolution": resolution})
        plot_loss(out)
        print(f"train-adapter: {max_steps} steps, last loss {loss:.4f}; {result['exports']['ip_adapter.safetensors']} "
              f"(load with instantstyle.load_ip_adapter(pipe, path, target={target!r})) and "
              f"{result['exports']['ip_adapter_diffusers.safetensors']} (diffusers' pipe.load_ip_adapter)",
              file=sys.stderr)
    accelerator.wait_for_everyone()
    return result

