"""Train an IP-Adapter whose image features go only into chosen blocks (InstantStyle's style
block by default), on accelerate: one process, or DDP / DeepSpeed ZeRO-2 under
`accelerate launch` or `torchrun`.

DATA is a JSONL file, one {"image": PATH, "text": CAPTION} per line (paths relative to the
file), or a folder of images with same-name .txt captions.  Images are resized on their short
side to --resolution and center-cropped; bad rows are skipped, counted and named in one line.

One process:   instantstyle train-adapter --model stabilityai/stable-diffusion-xl-base-1.0 \
                 --image-encoder h94/IP-Adapter/sdxl_models/image_encoder --data pairs.jsonl --out run/
All GPUs:      accelerate launch -m instantstyle train-adapter ... (or torchrun --nproc-per-node 8 -m ...)
DeepSpeed:     accelerate launch --config_file $(python -c "import instantstyle.training as t; print(t.DEEPSPEED_CONFIG)") \
                 -m instantstyle train-adapter ...
Resume:        the same command with --resume latest (weights, optimiser, LR schedule, RNG and data
               position are restored exactly; a kill loses only the steps since the last checkpoint)

--batch-size is the GLOBAL batch: the same value gives the same weights for any number of
processes (per-sample seeds, data sharded by sample index).  Outputs in --out: metrics.jsonl,
checkpoints/, validation/step-N.png, loss.png and final/ip_adapter.safetensors (targets only:
instantstyle.load_ip_adapter(pipe, path, target=...)) + final/ip_adapter_diffusers.safetensors
(every layer, for diffusers' pipe.load_ip_adapter).
"""
from __future__ import annotations

import json

from ..pipelines.errors import UserError


def parse_target(text: str):
    """A preset name, comma-separated module patterns, or a JSON list/dict."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise UserError(f"--target: not valid JSON: {exc}") from None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UserError("--target: expected a preset, patterns or a JSON dict")
    return parts[0] if len(parts) == 1 and "." not in parts[0] else parts


def add_data_arguments(parser, what: str):
    """--model --data --out --cache-dir; returns the group (a trainer adds its own models to it)."""
    g = parser.add_argument_group("models and data")
    g.add_argument("--model", required=True, metavar="DIR_OR_HUB_ID", help="diffusers pipeline (SDXL or SD1.5) folder or hub id")
    g.add_argument("--data", required=True, help="JSONL of {\"image\", \"text\"} or a folder of images + .txt captions")
    g.add_argument("--out", required=True, metavar="DIR", help=f"output folder (checkpoints, metrics, {what})")
    g.add_argument("--cache-dir", help="hub cache folder (default: HF_HUB_CACHE)")
    return g


def add_engine_arguments(parser, *, lr: float = 1e-4, batch_size: int = 8, max_steps: int = 1000,
                         checkpoint_every: int = 500, reference_images: bool = True) -> None:
    """The flags of the shared engine (``engine.run_training``): training, checkpoints, validation."""
    g = parser.add_argument_group("training")
    g.add_argument("--resolution", type=int, default=1024, help="square training size (default 1024)")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"GLOBAL batch size over all processes (default {batch_size})")
    g.add_argument("--gradient-accumulation", type=int, default=1,
                   help="micro-batches per step; processes x this must divide --batch-size (default 1)")
    g.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default {lr:g})")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warmup, then constant (default 0)")
    g.add_argument("--max-steps", type=int, default=max_steps, help=f"optimiser steps (default {max_steps})")
    g.add_argument("--noise-offset", type=float, default=0.0, help="noise offset (default 0: off)")
    g.add_argument("--max-grad-norm", type=float, default=None, help="clip gradients (default: off)")
    g.add_argument("--seed", type=int, default=0, help="init of the trained weights, data order, noise (default 0)")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="autocast through accelerate; frozen models in that dtype, trained weights float32")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in the backward")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; one GPU per process)")
    g.add_argument("--threads", type=int, default=None, help="CPU: torch threads per process")
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                   help=f"steps between checkpoints (default {checkpoint_every}; 0: none)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest K (default 3)")
    g.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint in --out, or a folder")
    g = parser.add_argument_group("validation")
    g.add_argument("--validation-every", type=int, default=0, help="steps between validation grids (default 0: off)")
    g.add_argument("--validation-prompts", nargs="+", default=[], metavar="PROMPT")
    if reference_images:
        g.add_argument("--validation-images", nargs="+", default=[], metavar="IMAGE", help="reference images")
    g.add_argument("--validation-inference-steps", type=int, default=20)
    g.add_argument("--validation-guidance", type=float, default=5.0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result (steps, last loss, exports) as JSON")


def print_result(args, result: dict) -> None:
    """--json: the result on stdout, once (the main process: the one that wrote the exports)."""
    if args.json and result["exports"]:
        print(json.dumps(result))


def add_arguments(parser) -> None:
    g = add_data_arguments(parser, "exports")
    g.add_argument("--image-encoder", metavar="DIR_OR_HUB_ID",
                   help="CLIP vision model with projection (default: MODEL/image_encoder when MODEL is a folder)")
    g = parser.add_argument_group("adapter")
    g.add_argument("--target", default="style",
                   help="where image features go: a preset (style, layout, style+layout, all), comma-separated module "
                        "patterns (up_blocks.0.attentions.1) or a JSON set_ip_adapter_scale dict (default: style)")
    g.add_argument("--format", choices=("base", "plus"), default="base",
                   help="base: Linear+LayerNorm to 4 tokens from CLIP image embeds; plus: resampler to 16 tokens "
                        "from CLIP's penultimate hidden states (default: base)")
    g.add_argument("--drop-rates", type=float, nargs=3, default=(0.05, 0.05, 0.05), metavar=("IMAGE", "TEXT", "BOTH"),
                   help="probabilities of dropping the image, the text, both (default 0.05 0.05 0.05)")
    add_engine_arguments(parser)


def set_threads(args) -> None:
    """--threads, or an even share of the cores per process on CPU under a launcher."""
    import os

    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads: expected a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif (args.device or "cpu").startswith("cpu") and "WORLD_SIZE" in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(1, int(os.environ["WORLD_SIZE"]))))  # processes share the cores


def engine_kwargs(args) -> dict:
    """The shared engine's keyword arguments from parsed flags."""
    names = ("resolution", "batch_size", "lr", "weight_decay", "lr_warmup_steps", "max_steps", "checkpoint_every",
             "keep_checkpoints", "resume", "seed", "mixed_precision", "gradient_checkpointing",
             "gradient_accumulation", "device", "noise_offset", "max_grad_norm", "validation_every",
             "validation_prompts", "validation_inference_steps", "validation_guidance")
    kwargs = {name: getattr(args, name) for name in names}
    kwargs.update(progress=not args.no_progress, hub={"cache_dir": args.cache_dir} if args.cache_dir else None)
    return kwargs


def run(args) -> int:
    from .train import train_adapter

    set_threads(args)
    image, text, both = args.drop_rates
    print_result(args, train_adapter(args.model, args.data, args.out, image_encoder=args.image_encoder,
                                     target=parse_target(args.target), format=args.format, drop_image=image,
                                     drop_text=text, drop_both=both, validation_images=args.validation_images,
                                     **engine_kwargs(args)))
    return 0
