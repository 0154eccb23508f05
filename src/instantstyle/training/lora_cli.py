"""Train a LoRA on registry targets with peft, in diffusers' LoRA format: B-LoRA (Frenkel et
al., "Implicit Style-Content Separation using B-LoRA", ECCV 2024) trains SDXL's
up_blocks.0.attentions.0 (content) and up_blocks.0.attentions.1 (style) on one image.

DATA is as for train-adapter: a JSONL file, one {"image": PATH, "text": CAPTION} per line, or a
folder of images with same-name .txt captions (B-LoRA: one image and its caption).

B-LoRA:      instantstyle train-lora --model stabilityai/stable-diffusion-xl-base-1.0 --data one/ \
               --out run/ --target b-lora
All GPUs:    accelerate launch -m instantstyle train-lora ... (or torchrun --nproc-per-node 8 -m ...)
Resume:      the same command with --resume latest (exact: weights, optimiser, data position)

Targets: b-lora (both blocks), b-lora-style, b-lora-content, any preset of `instantstyle blocks`,
or comma-separated module patterns; LoRA goes into to_q, to_k, to_v, to_out.0 of every attention
layer (attn1 and attn2) there.  --batch-size is the GLOBAL batch, as for train-adapter.
Outputs in --out: metrics.jsonl, checkpoints/, validation/step-N.png, loss.png and
final/pytorch_lora_weights.safetensors (pipe.load_lora_weights(OUT/final), or only one part:
instantstyle.load_b_lora(pipe, OUT/final, part="style")).  Needs peft: pip install "instantstyle[train]".
"""
from __future__ import annotations

from ..pipelines.errors import UserError
from .cli import (
    add_data_arguments,
    add_engine_arguments,
    engine_kwargs,
    parse_target,
    print_result,
    set_threads,
)


def add_arguments(parser) -> None:
    add_data_arguments(parser, "the LoRA export")
    g = parser.add_argument_group("LoRA")
    g.add_argument("--target", default="b-lora",
                   help="where the LoRA goes: a preset (b-lora, b-lora-style, b-lora-content, style, all, ...) or "
                        "comma-separated module patterns (default: b-lora)")
    g.add_argument("--rank", type=int, default=64, help="LoRA rank (default 64, as B-LoRA)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    g.add_argument("--drop-text", type=float, default=0.0, help="probability of an empty caption (default 0)")
    add_engine_arguments(parser, lr=5e-5, batch_size=1, max_steps=1000, checkpoint_every=500, reference_images=False)


def run(args) -> int:
    from .lora import MISSING_PEFT, require_peft
    from .lora_train import train_lora

    try:
        require_peft()
    except ImportError:
        raise UserError(MISSING_PEFT) from None
    set_threads(args)
    print_result(args, train_lora(args.model, args.data, args.out, target=parse_target(args.target), rank=args.rank,
                                  lora_alpha=args.lora_alpha, drop_text=args.drop_text, **engine_kwargs(args)))
    return 0
