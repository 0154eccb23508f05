"""``train_lora``: a LoRA on registry targets (B-LoRA's ``b-lora-style`` / ``b-lora-content``),
trained by the same engine as ``train_adapter`` (``engine``): same data, per-sample seeds,
sharding, checkpoints, exact resume, metrics, validation and loss plot.  Only the setup
differs: no image encoder, and ``lora`` installs the trained part and writes the export.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..pipelines.errors import UserError
from .engine import FIXED_SETTINGS as SHARED_FIXED_SETTINGS
from .engine import Parts, load_pipeline, run_training

#: settings a resumed run must share with its checkpoint
FIXED_SETTINGS = SHARED_FIXED_SETTINGS + ("rank", "lora_alpha")


def _check(settings: dict) -> None:
    rank, alpha = settings["rank"], settings["lora_alpha"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"--rank: expected a positive integer, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise UserError(f"--lora-alpha: expected a positive number, got {alpha!r}")
    if settings["validation_every"] and not settings["validation_prompts"]:
        raise UserError("--validation-every: needs --validation-prompts")


def train_lora(model: str, data: str, out: str, *, target="b-lora-style", rank: int = 64,
               lora_alpha: float | None = None, resolution: int = 1024, batch_size: int = 1, lr: float = 5e-5,
               weight_decay: float = 0.01, lr_warmup_steps: int = 0, max_steps: int = 1000,
               checkpoint_every: int = 500, keep_checkpoints: int = 3, resume: str | None = None, seed: int = 0,
               mixed_precision: str = "no", gradient_checkpointing: bool = False, gradient_accumulation: int = 1,
               device: str | None = None, noise_offset: float = 0.0, drop_text: float = 0.0,
               max_grad_norm: float | None = None, validation_every: int = 0,
               validation_prompts: Sequence[str] = (), validation_inference_steps: int = 20,
               validation_guidance: float = 5.0, progress: bool = True, hub: dict | None = None) -> dict:
    """Train a LoRA on ``target``'s attention projections (``to_q/k/v/out.0`` of attn1 and attn2);
    returns ``{"step", "loss", "exports": {"pytorch_lora_weights.safetensors": path}, "out"}``.

    Defaults follow B-LoRA (rank 64, lr 5e-5, batch 1, 1000 steps).  ``lora_alpha`` defaults to
    ``rank``.  The export in ``OUT/final`` is diffusers' LoRA format: ``pipe.load_lora_weights``
    or ``instantstyle.load_b_lora(pipe, path, part=...)``.  See ``instantstyle train-lora --help``.
    """
    settings = {k: v for k, v in locals().items() if k not in ("hub", "progress")}
    settings.update(validation_prompts=list(validation_prompts), validation_images=[], drop_image=0.0, drop_both=0.0)
    try:
        from .lora import require_peft

        require_peft()
    except ImportError as exc:
        raise UserError(str(exc)) from None

    def setup(weight_dtype) -> Parts:
        from .loop import Conditioner
        from .lora import install_lora, write_lora

        pipe = load_pipeline(model, weight_dtype, hub or {})
        try:
            install_lora(pipe.unet, target, rank, lora_alpha, seed=seed)
        except (ValueError, TypeError, KeyError) as exc:  # rank and alpha were checked before: the target
            message = str(exc)
            raise UserError(f"--target: {message.removeprefix('target: ')}") from None
        return Parts(pipe=pipe, frozen=[], conditioner=lambda device: Conditioner(pipe, None, None, None, device,
                                                                                    weight_dtype),
                     export=lambda folder, extra: write_lora(pipe, folder, dict(extra, target=target, rank=rank,
                                                                                lora_alpha=lora_alpha)),
                     summary=lambda exports: (f"{next(iter(exports.values()))} (pipe.load_lora_weights, or "
                                              "instantstyle.load_b_lora(pipe, path, part=...))"))

    return run_training("train-lora", settings, setup, fixed=FIXED_SETTINGS, check=_check, hub=hub, progress=progress)
