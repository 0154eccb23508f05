"""Flags shared by ``stylize`` and ``stylize-batch``, and their validation.

Every check here runs before any model is loaded: a wrong number costs a one-line error,
not minutes of loading followed by a traceback (or worse, a black image and exit 0).
"""
from __future__ import annotations

import math
import os
import re

from .errors import UserError

DTYPES = ("float16", "bfloat16", "float32")
BACKENDS = ("auto", "triton", "torch")
#: hub flags of the --model/--ip-adapter/--image-encoder loaders
HUB_FLAGS = ("cache_dir",)


def add_model_arguments(parser, ip_adapter_required_note: str = "") -> None:
    g = parser.add_argument_group("models (local folders/files or hub ids; HF_HUB_OFFLINE=1 uses the local cache only)")
    g.add_argument("--model", required=True, help="diffusers pipeline folder or hub id (SDXL, SD1.5, Flux or SD3.5)")
    g.add_argument("--ip-adapter", metavar="PATH_OR_ID",
                   help="IP-Adapter checkpoint: a .bin/.safetensors file, a folder or a hub id (with --weight-name), "
                        "e.g. h94/IP-Adapter --subfolder sdxl_models --weight-name ip-adapter_sdxl.safetensors"
                        + ip_adapter_required_note)
    g.add_argument("--subfolder", help="the checkpoint's subfolder in the --ip-adapter folder or hub repo")
    g.add_argument("--weight-name", help="the checkpoint's file name in the --ip-adapter folder or hub repo")
    g.add_argument("--image-encoder", metavar="PATH_OR_ID",
                   help="CLIP vision model (with projection) or SigLIP vision folder or hub id; default: 'image_encoder' next to the "
                        "IP-Adapter (diffusers' layout, e.g. h94/IP-Adapter sdxl_models/image_encoder)")
    g.add_argument("--cache-dir", help="hub cache folder (default: HF_HUB_CACHE)")
    g.add_argument("--content-text-encoder", metavar="DIR",
                   help="text model (and its tokenizer) in the image encoder's space, for --content-prompt: a CLIP "
                        "text model with projection (ViT-H for SD1.5, ViT-L/14 for XLabs Flux) or SigLIP's text tower "
                        "(InstantX Flux); default: the SDXL pipeline's text_encoder_2")


def add_runtime_arguments(parser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    g.add_argument("--true-cfg-scale", type=float, default=None, metavar="S",
                   help="Flux only: true classifier-free guidance, S > 1 (Flux's --guidance is distilled guidance and "
                        "reads no negative prompt): a second, negative pass per step with --negative-prompt (and "
                        "--negative-style); twice the step cost")
    g.add_argument("--height", type=int, default=None, help="multiple of 8; default: the model's native size")
    g.add_argument("--width", type=int, default=None, help="multiple of 8; default: the model's native size")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on cuda, float32 on cpu")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="attention backend of the fused processors: auto (default), triton (fused kernel, CUDA) or "
                        "torch (PyTorch path), e.g. to compare them; the sidecar records it")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default: one less than the available cores, at most 16). On a shared "
                        "machine, more threads than free cores makes runs erratic (0.2 s to 30 s seen on 2 cores)")


#: the largest seed: torch's generators take an unsigned 64-bit seed (one more raises "Overflow
#: when unpacking long long" deep in generation).  Note that torch's CPU generator (Mersenne
#: Twister) uses only the low 32 bits, so on it seeds that differ by a multiple of 2**32 draw the
#: same noise; CUDA's generator uses all 64.
SEED_MAX = 2**64 - 1


def shown(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages stay one readable line, whatever
    the input (repr also escapes control characters, so a hostile name can't drive the terminal)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f" ({len(text)} chars)"


def parse_seed(name: str, value) -> int:
    """A seed: an integer in [0, 2**64), or ValueError naming ``name``, the range and the value.

    One rule for every command: a negative seed (``-1`` as "random" in other tools) is refused,
    never drawn at random nor wrapped, so a sidecar's seed always reproduces its image."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]{1,21}\s*", value):  # a CSV cell
        number = int(value)
    if number is None or not 0 <= number <= SEED_MAX:
        hint = " (-1 does not mean random here: give a seed)" if number is not None and number < 0 else ""
        raise ValueError(f"{name}: expected an integer in [0, {SEED_MAX}], got {shown(value)}{hint}")
    return number


def check_seed(flag: str, value) -> int:
    """:func:`parse_seed` for a command-line flag: a one-line :class:`UserError`."""
    try:
        return parse_seed(flag, value)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def finite(flag: str, value, low=None, high=None, low_open=False):
    """A finite number in [low, high] (or (low, high] with low_open)."""
    if value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag}: expected a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise UserError(f"{flag}: expected {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise UserError(f"{flag}: expected <= {high}, got {value}")
    return value


def check_runtime(args) -> None:
    finite("--steps", args.steps, 1)
    finite("--guidance", args.guidance, 0)
    finite("--true-cfg-scale", args.true_cfg_scale, 1, low_open=True)  # 1 or less: diffusers skips the pass
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"{flag}: expected a positive multiple of 8 (the VAE downsamples by 8), got {value}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: expected a positive integer, got {args.threads}")
    if args.backend == "triton" and not (args.device or "").startswith("cuda") and not _cuda():
        raise UserError("--backend triton: the fused Triton kernel runs on CUDA GPUs; use --backend torch or auto on CPU")


def check_true_cfg(true_cfg_scale, negative_prompt, family) -> None:
    """Flux's negative prompt acts only under true CFG, and true CFG only with a negative
    prompt (diffusers silently skips either alone); other families run CFG with --guidance.
    Raises ValueError (a row's reason in stylize-batch; the caller words flag errors)."""
    if true_cfg_scale is not None and family != "flux":
        raise ValueError(f"--true-cfg-scale: Flux pipelines only; this {family or 'UNet'} pipeline runs classifier-free "
                         "guidance with --guidance")
    if family == "flux" and (true_cfg_scale is None) != (negative_prompt is None):
        raise ValueError("--true-cfg-scale / --negative-prompt: Flux uses a negative prompt only under true CFG and true "
                         "CFG only with a negative prompt: give both, or neither")


def check_start_end(args) -> None:
    finite("--start-at", args.start_at, 0, 1)
    finite("--end-at", args.end_at, 0, 1)
    if args.start_at >= args.end_at:
        raise UserError(f"--start-at/--end-at: expected start < end, got {args.start_at} >= {args.end_at}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def default_threads() -> int:
    """One less than the cores this process may use (the rest of the machine keeps one), 1..16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores - 1))


def device_and_dtype(args):
    """``(device string, torch dtype)``; a device this torch build can't use is a user error."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device: not a device name: {device!r} (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this torch build sees no CUDA GPU "
                            f"(torch {torch.__version__}, cuda {torch.version.cuda or 'none'}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here")
    elif parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UserError(f"--device: unsupported device type {parsed.type!r}")
    dtype = getattr(torch, args.dtype or ("float16" if parsed.type == "cuda" else "float32"))
    if parsed.type == "cpu":
        torch.set_num_threads(args.threads or default_threads())
    return device, dtype


def hub_kwargs(args) -> dict:
    return {k: getattr(args, k) for k in HUB_FLAGS if getattr(args, k, None)}


# -- the IP-Adapter controls (issue 19): names checked against the processors' own tuples --------
#: flag -> (the API's keyword, the tuple of valid names in instantstyle.processors.targets.weight_types)
CONTROL_NAMES = {"--weight-type": ("weight_type", "WEIGHT_TYPES"), "--embeds-scaling": ("embeds_scaling", "EMBEDS_SCALING")}


def control_choices(tuple_name: str):
    """The valid names (``WEIGHT_TYPES`` / ``EMBEDS_SCALING``), or None where this build lacks them."""
    try:
        from instantstyle.processors.targets import weight_types
    except ImportError:
        return None
    return tuple(getattr(weight_types, tuple_name, ()) or ()) or None


def check_control_name(name: str, value, tuple_name: str):
    """``value`` if it is one of the valid names, else ValueError naming ``name`` and listing them."""
    if value is None:
        return None
    valid = control_choices(tuple_name)
    if valid is None:
        raise ValueError(f"{name}: this build has no {tuple_name} (instantstyle.processors.targets.weight_types is missing)")
    if value not in valid:
        raise ValueError(f"{name}: expected one of {', '.join(valid)}, got {shown(value)}")
    return value


def add_control_arguments(parser) -> None:
    g = parser.add_argument_group("IP-Adapter controls (see the README's Controls table)")
    g.add_argument("--weight-type", metavar="NAME", default=None,
                   help="how the weight varies over the target layers, e.g. linear, style transfer, composition; "
                        "an unknown name lists the valid ones (default: the loader's, linear)")
    g.add_argument("--composition-weight", type=float, default=None, metavar="W",
                   help="the weight of the composition (layout) layers for the weight types that set it apart")
    g.add_argument("--embeds-scaling", metavar="MODE", default=None,
                   help="how the image tokens scale the attention: V only (default), K+V, K+V w/ C penalty, ...; "
                        "an unknown name lists the valid ones")
    g.add_argument("--negative-style", metavar="IMAGE", default=None,
                   help="an image for the unconditional (CFG) half instead of zeros: its style is steered away from")


def check_controls(args) -> None:
    """The control flags, before anything loads: one line listing the valid names."""
    for flag, (attribute, tuple_name) in CONTROL_NAMES.items():
        try:
            check_control_name(flag, getattr(args, attribute, None), tuple_name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    finite("--composition-weight", getattr(args, "composition_weight", None))


def control_kwargs(source) -> dict:
    """``weight_type``, ``composition_weight``, ``embeds_scaling`` of ``source`` (args or a dict)
    that are set: what ``InstantStyle``/``configure`` take (None keeps the loader's default)."""
    get = source.get if isinstance(source, dict) else (lambda k: getattr(source, k, None))
    return {k: get(k) for k in ("weight_type", "composition_weight", "embeds_scaling") if get(k) is not None}
