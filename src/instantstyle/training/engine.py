"""The training engine every trainer shares (``train-adapter``, ``train-lora``): accelerate, the
global batch, exact resume, checkpoints, metrics, validation, the loss plot and the exports.

A trainer hands :func:`run_training` its settings and a ``setup`` callback that loads the
frozen pipeline and installs the trainable part into its UNet (returning :class:`Parts`);
everything else (one optimiser step over per-sample seeds and sharded data, checkpoints
every N keep K, ``--resume latest``, ``metrics.jsonl``, validation grids, ``loss.png``) is
the same code for both, so a fix here fixes both.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..pipelines.errors import UserError

MIXED_PRECISION = ("no", "fp16", "bf16")
#: settings every trainer's resumed run must share with its checkpoint (the process count and
#: the accumulation split may change: the global batch and its samples stay the same)
FIXED_SETTINGS = ("target", "resolution", "batch_size", "seed", "lr", "weight_decay", "lr_warmup_steps",
                  "noise_offset", "drop_image", "drop_text", "drop_both")


@dataclass
class Parts:
    """What a trainer's ``setup`` built: the frozen pipeline with the trainable part in its UNet."""

    pipe: object
    frozen: Sequence  # modules to freeze and put on the device besides the pipeline (an image encoder)
    conditioner: Callable  # device -> loop.Conditioner
    export: Callable[[str, dict], dict[str, str]]  # (folder, metadata) -> {file name: path}
    summary: Callable[[dict], str]  # exports -> the last line printed



def accelerator_on_cpu(device, cuda: bool) -> bool:
    """accelerate's ``cpu=`` flag.  Under an accelerate DeepSpeed config it must stay False:
    ``cpu=True`` drops the DeepSpeed plugin and trains plain.  DeepSpeed ranks are connected
    on accelerators only (accelerate starts no process group for them on CPU), so there
    several CPU processes would be that many unconnected trainings: refused."""
    wants_cpu = (device or "").startswith("cpu") or not cuda
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return wants_cpu
    if wants_cpu and cuda:
        raise UserError("--device cpu: the accelerate config asks for DeepSpeed, which then trains on the GPUs; "
                        "drop --device cpu, or launch without the DeepSpeed config")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if wants_cpu and world > 1:
        raise UserError(f"DeepSpeed on CPU: accelerate connects DeepSpeed ranks on GPUs only, so {world} CPU processes "
                        "would train apart; use one process, or torchrun/accelerate without the DeepSpeed config (DDP)")
    return False

def check_settings(settings: dict, world: int) -> None:
    """One-line errors for settings every trainer shares, before any model loads."""
    def positive(name, allow_zero=False):
        value = settings[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
            raise UserError(f"{name.replace('_', '-')}: expected a {'non-negative' if allow_zero else 'positive'} "
                            f"integer, got {value!r}")

    for name in ("resolution", "batch_size", "max_steps", "gradient_accumulation", "keep_checkpoints"):
        positive(name)
    for name in ("checkpoint_every", "validation_every", "lr_warmup_steps", "validation_inference_steps"):
        positive(name, allow_zero=True)
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


def load_pipeline(model: str, weight_dtype, hub: dict):
    """The frozen diffusers pipeline a trainer trains in (a UNet pipeline: SDXL, SD1.5)."""
    import torch
    from diffusers import DiffusionPipeline

    from ..pipelines.loading import from_pretrained

    dtype = {} if weight_dtype == torch.float32 else {"torch_dtype": weight_dtype}
    pipe = from_pretrained("--model", DiffusionPipeline.from_pretrained, model, **dtype, **hub)
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise UserError(f"--model: {model!r} is a {type(pipe).__name__}; training takes a UNet pipeline (SDXL, SD1.5)")
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; it only encodes, once per sample
    return pipe


def run_training(name: str, settings: dict, setup: Callable, *, fixed: Sequence[str] = FIXED_SETTINGS,
                 check: Callable | None = None, hub: dict | None = None, progress: bool = True) -> dict:
    """Train what ``setup(weight_dtype)`` installs; returns ``{"step", "loss", "out", "exports"}``.

    ``settings`` holds the shared arguments (see ``train_adapter``) plus the trainer's own;
    ``fixed`` names those a resume must not change; ``check(settings)`` adds the trainer's own
    one-line checks (run before anything is written or loaded)."""
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    from . import checkpoints as ckpt
    from .data import Loader, read_dataset
    from .loop import Drops, train_step
    from .model import trainable_parameters
    from .report import MetricsWriter, plot_loss, reset_metrics, validation_grid

    s = settings
    if s["mixed_precision"] not in MIXED_PRECISION:
        raise UserError(f"--mixed-precision: expected one of {', '.join(MIXED_PRECISION)}, got {s['mixed_precision']!r}")
    cpu = accelerator_on_cpu(s["device"], torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=s["mixed_precision"], gradient_accumulation_steps=s["gradient_accumulation"],
                              cpu=cpu)
    world, main = accelerator.num_processes, accelerator.is_main_process
    check_settings(s, world)
    if check is not None:
        check(s)
    drops = Drops(s["drop_image"], s["drop_text"], s["drop_both"])
    try:
        drops.check()
    except ValueError as exc:
        raise UserError(f"--drop-*: {exc}") from None
    out = os.path.abspath(s["out"])
    if main:
        from ..pipelines.outputs import writable_folder

        writable_folder(out, "--out")
        ckpt.remove_temporaries(out)
    accelerator.wait_for_everyone()
    try:
        dataset = read_dataset(s["data"])
    except (OSError, ValueError) as exc:
        raise UserError(f"--data: {exc}") from None
    if not len(dataset):
        raise UserError(f"--data: no usable rows in {s['data']!r}" + (f"; {dataset.warning}" if dataset.warning else ""))
    if dataset.warning and main:
        print(f"instantstyle: warning: {dataset.warning}", file=sys.stderr)
    try:
        resume_path = ckpt.resolve_resume(out, s["resume"])
    except ValueError as exc:
        raise UserError(str(exc)) from None

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s["mixed_precision"], torch.float32)
    parts = setup(weight_dtype)
    pipe, unet = parts.pipe, parts.pipe.unet
    for module in (pipe.vae, *parts.frozen, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.to(accelerator.device)
    for module in parts.frozen:
        module.to(accelerator.device)
    if s["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [p for _, p in trainable_parameters(unet)]
    optimizer = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    warmup = s["lr_warmup_steps"]
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0)
    # the LR schedule is stepped by hand, once per optimiser step (accelerate's wrapper steps
    # it once per process, which would tie the schedule to the process count)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    batch_size, accumulation, max_steps, seed = s["batch_size"], s["gradient_accumulation"], s["max_steps"], s["seed"]
    if plugin is not None:  # DeepSpeed wants the micro-batch, which it would read from a prepared DataLoader
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size // (world * accumulation)
    model_prepared, optimizer = accelerator.prepare(unet, optimizer)

    start, elapsed = 0, 0.0
    if resume_path is not None:
        saved = ckpt.read_state(resume_path)["settings"]  # settings first: a changed --rank changes shapes
        changed = [k for k in fixed if json.dumps(saved.get(k), default=str) != json.dumps(s.get(k), default=str)]
        if changed:
            k = changed[0]
            raise UserError(f"--resume: {resume_path} was trained with {k}={saved.get(k)!r}, this run has "
                            f"{s.get(k)!r}; resume with the same settings or start a new --out")
        state = ckpt.load_checkpoint(resume_path, unet, optimizer, lr_scheduler, accelerator)
        start, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
    if main:
        reset_metrics(out, start)
    accelerator.wait_for_everyone()

    conditioner = parts.conditioner(accelerator.device)
    warn = (lambda m: print(f"instantstyle: warning: {m}", file=sys.stderr)) if main else (lambda m: None)
    load = Loader(dataset, s["resolution"], seed, warn)
    metrics = MetricsWriter(out) if main else None
    loss, began = float("nan"), time.perf_counter() - elapsed

    def checkpoint(step: int) -> None:
        ckpt.save_checkpoint(out, step, unet, optimizer, lr_scheduler, accelerator,
                             {"settings": s, "samples": step * batch_size, "elapsed": time.perf_counter() - began,
                              "processes": world}, s["keep_checkpoints"])

    def validate(step: int) -> None:
        if main:
            was_training = unet.training
            unet.eval()
            with accelerator.autocast():
                validation_grid(pipe, conditioner, list(s["validation_images"]), list(s["validation_prompts"]),
                                s["resolution"], s["validation_inference_steps"], s["validation_guidance"], seed,
                                os.path.join(out, "validation", f"step-{step:06d}.png"))
            unet.train(was_training)
        accelerator.wait_for_everyone()

    bar = tqdm(total=max_steps, initial=start, desc=name, unit="step", file=sys.stderr,
               disable=not (main and progress), dynamic_ncols=True)
    try:
        for step in range(start, max_steps):
            loss = train_step(step, model_prepared, accelerator, optimizer, lr_scheduler, conditioner, noise_scheduler,
                              load, seed=seed, global_batch=batch_size, accumulation=accumulation, drops=drops,
                              noise_offset=s["noise_offset"], resolution=s["resolution"],
                              max_grad_norm=s["max_grad_norm"])
            done = step + 1
            current_lr = optimizer.param_groups[0]["lr"]
            if metrics is not None:
                metrics.write(done, loss, current_lr, time.perf_counter() - began)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{current_lr:.2e}")
            if s["checkpoint_every"] and done % s["checkpoint_every"] == 0:
                checkpoint(done)
            if s["validation_every"] and (done % s["validation_every"] == 0 or done == max_steps):
                validate(done)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    result = {"step": max_steps, "loss": loss, "out": out, "exports": {}}
    accelerator.wait_for_everyone()
    if main:
        result["exports"] = parts.export(os.path.join(out, "final"),
                                         {"model": s["model"], "steps": max_steps, "seed": seed,
                                          "resolution": s["resolution"]})
        plot_loss(out)
        print(f"{name}: {max_steps} steps, last loss {loss:.4f}; {parts.summary(result['exports'])}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return result
