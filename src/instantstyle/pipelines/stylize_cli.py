"""Stylise an image with InstantStyle: a style reference, a prompt, a PNG out.

The IP-Adapter goes only into the preset's blocks (SDXL "style" = up_blocks.0.attentions.1),
the reference's content is subtracted in CLIP space (--content-prompt), and fused
decoupled-attention processors run every cross-attention layer.  Next to the image,
<image>.json (e.g. dog.png.json) records every setting that applied, the resolved target
modules, backend, scheduler, versions and timings; PNGs also carry the settings in text chunks.

example (SDXL, the official checkpoints from the hub, h94/IP-Adapter):
  instantstyle stylize \\
      --model stabilityai/stable-diffusion-xl-base-1.0 \\
      --ip-adapter h94/IP-Adapter --subfolder sdxl_models --weight-name ip-adapter_sdxl.safetensors \\
      --style reference.png --content-prompt "a cat" \\
      --prompt "a dog sitting on a bench" --preset style --scale 1.0 \\
      --out dog.png

The image encoder defaults to diffusers' layout, "image_encoder" next to the checkpoint
(sdxl_models/image_encoder); --image-encoder overrides it.  Local files and folders work the
same (--ip-adapter IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors); HF_HUB_OFFLINE=1 reads
the local hub cache only.  Add --controlnet DIR --control-image IMG [--canny] for spatial control.

--method style-aligned runs StyleAligned instead (shared self-attention, no IP-Adapter):
a batch of two or more prompts whose images share the first image's style.  --out a.png
writes a-0.png, a-1.png, ... (one per --prompt) and a.png.json:
  instantstyle stylize --method style-aligned --model stabilityai/stable-diffusion-xl-base-1.0 \\
      --prompt "a toy train, minimal origami" --prompt "a toy airplane, minimal origami" \\
      --prompt "a toy car, minimal origami" --out toys.png
"""
from __future__ import annotations

import os
import sys
import time

from .cli_args import (
    add_control_arguments,
    add_model_arguments,
    add_runtime_arguments,
    check_controls,
    check_runtime,
    check_seed,
    check_start_end,
    check_true_cfg,
    device_and_dtype,
    finite,
    control_kwargs,
    hub_kwargs,
)
from .errors import UserError
from .outputs import check_output, png_text, save_image, sidecar_path, write_json

#: every family's presets (UNet; Flux double/single/content; SD3 joint): the registry
#: refuses, in one line, a preset the loaded model's family lacks
PRESET_CHOICES = ("style", "layout", "style+layout", "all", "double", "single", "content", "joint")
METHODS = ("instantstyle", "style-aligned")
#: settings that only one method reads: the sidecar records only those that applied
ONLY_FOR = {
    "instantstyle": ("ip_adapter", "subfolder", "weight_name", "image_encoder", "content_text_encoder", "style",
                     "content_prompt", "content_scale", "preset", "target", "scale", "weight_type", "composition_weight",
                     "embeds_scaling", "negative_style"),
    "style-aligned": ("keys_scale", "score_shift", "only_self_level", "no_shared_norms"),
}
NOT_SETTINGS = ("run", "command", "debug")


def add_arguments(parser) -> None:
    parser.add_argument("--method", choices=METHODS, default="instantstyle",
                        help="instantstyle: IP-Adapter in style blocks (default); style-aligned: a batch of "
                             "prompts sharing the first image's style through self-attention")
    add_model_arguments(parser, " (instantstyle)")
    g = parser.add_argument_group("style")
    g.add_argument("--style", action="append", metavar="IMAGE", help="style reference (repeatable; instantstyle)")
    g.add_argument("--content-prompt", help="what the reference shows ('a cat'); subtracted from its embedding")
    g.add_argument("--content-scale", type=float, default=0.5, help="how much content to subtract (default 0.5)")
    g.add_argument("--preset", choices=PRESET_CHOICES, default=None,
                   help="blocks to inject into (default: style for UNets and InstantX Flux, all for XLabs Flux and SD3.5; "
                        "Flux also double, single, content)")
    g.add_argument("--target", action="append", metavar="PATTERN",
                   help="module prefix/glob instead of --preset (repeatable), e.g. --target up_blocks.0.attentions.1")
    g.add_argument("--scale", type=float, default=1.0, help="IP-Adapter scale in the target blocks, >= 0 (default 1.0)")
    g.add_argument("--start-at", type=float, default=0.0,
                   help="fraction of the schedule where the injection starts (default 0; both methods)")
    g.add_argument("--end-at", type=float, default=1.0, help="fraction of the schedule where it ends (default 1)")
    add_control_arguments(parser)
    g = parser.add_argument_group("style-aligned")
    g.add_argument("--keys-scale", type=float, default=1.0, help="logit scale on the shared reference keys (default 1.0)")
    g.add_argument("--score-shift", type=float, default=0.0, help="logit shift on the shared reference keys (default 0)")
    g.add_argument("--only-self-level", type=float, default=0.0,
                   help="fraction of self-attention layers left unshared, evenly spaced (default 0)")
    g.add_argument("--no-shared-norms", action="store_true",
                   help="keep each image's own GroupNorm statistics (default: shared with the reference, as upstream)")
    g = parser.add_argument_group("generation")
    g.add_argument("--prompt", action="append", required=True,
                   help="the prompt; with --method style-aligned repeat it: one image per prompt, styled like the first")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--controlnet", help="ControlNet folder or hub id (needs --control-image)")
    g.add_argument("--control-image", help="control image for --controlnet")
    g.add_argument("--canny", action="store_true", help="turn --control-image into Canny edges first")
    g.add_argument("--seed", type=int, default=0, help="an integer in [0, 2**64 - 1] (default 0; -1 is refused, "
                   "it does not mean random)")
    g.add_argument("--out", required=True, help="output image (.png, .jpg, .webp); <out>.json is written next to it")
    add_runtime_arguments(parser)


def open_image(flag: str, path: str):
    """An RGB image, or a one-line error for a missing, truncated, bomb-sized or non-image file."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UserError(f"{flag}: no such file: {path}" if not os.path.isdir(path) else f"{flag}: {path} is a folder")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes now: a truncated file fails here, not mid-run
    except UnidentifiedImageError:
        raise UserError(f"{flag}: not an image file: {path}") from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"{flag}: {path}: refused as a possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise UserError(f"{flag}: can't read {path}: {exc}") from None


def check_method_arguments(args) -> None:
    """Which flags each --method needs or can't use, and the numbers they take."""
    check_start_end(args)
    if args.method == "instantstyle":
        if args.no_shared_norms:
            raise UserError("--no-shared-norms: used only by --method style-aligned")
        for flag, value in (("--ip-adapter", args.ip_adapter), ("--style", args.style)):
            if not value:
                raise UserError(f"{flag}: required with --method instantstyle")
        if len(args.prompt) > 1:
            raise UserError(f"--prompt: --method instantstyle takes one prompt, got {len(args.prompt)}")
        if args.target and args.preset:
            raise UserError("--target and --preset: give one (--target names modules, --preset a block preset)")
        finite("--scale", args.scale, 0)
        finite("--content-scale", args.content_scale, 0)
        check_controls(args)
        args.prompt = args.prompt[0]
        return
    for flag, value in (("--ip-adapter", args.ip_adapter), ("--image-encoder", args.image_encoder), ("--style", args.style),
                        ("--content-prompt", args.content_prompt), ("--content-text-encoder", args.content_text_encoder),
                        ("--target", args.target), ("--preset", args.preset), ("--subfolder", args.subfolder),
                        ("--weight-name", args.weight_name), ("--weight-type", args.weight_type),
                        ("--composition-weight", args.composition_weight), ("--embeds-scaling", args.embeds_scaling),
                        ("--negative-style", args.negative_style), ("--true-cfg-scale", args.true_cfg_scale)):
        if value:
            raise UserError(f"{flag}: not used by --method {args.method}, which takes its style from the first prompt's image")
    finite("--keys-scale", args.keys_scale)
    finite("--score-shift", args.score_shift)
    if not 0.0 <= args.only_self_level <= 1.0:
        raise UserError(f"--only-self-level: expected a fraction in [0, 1], got {args.only_self_level}")
    if len(args.prompt) < 2:
        raise UserError("--prompt: --method style-aligned needs two or more prompts (the first image is the style "
                        f"reference of the others), got {len(args.prompt)}")


def output_paths(out: str, count: int) -> list:
    """``a.png`` for one image; ``a-0.png``, ``a-1.png``, ... for a batch."""
    if count == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(count)]


def _target_message(exc: Exception) -> str:
    """The registry's hint is Python syntax; on the command line a pattern is a --target flag."""
    text = str(exc)
    cut = text.find("To target modules by path")
    return text if cut < 0 else text[:cut] + "To target modules by path use --target PATTERN (repeatable)."


def _instantstyle(args, styles, pipe, encoder, processor, text_encoder, tokenizer, ip_file, negative=None):
    """Wire the pipeline once (InstantStyle); returns ``generate(call) -> (images, sidecar details)``."""
    from instantstyle.pipelines.content import ContentSubtractionError
    from instantstyle.pipelines.instantstyle import InstantStyle, layers_of

    try:
        style = InstantStyle(pipe, ip_file, target=args.target or args.preset, scale=args.scale,
                             image_encoder=encoder, image_processor=processor, text_encoder=text_encoder, tokenizer=tokenizer,
                             image_encoder_folder=None, start_at=args.start_at, end_at=args.end_at, **control_kwargs(args))
    except (ValueError, TypeError, FileNotFoundError, KeyError, NotImplementedError) as exc:
        raise UserError(f"--ip-adapter / --preset / --target / controls: {_target_message(exc)}") from None
    args.resolved_target = style.target  # the family's default when neither flag was given
    try:
        check_true_cfg(args.true_cfg_scale, args.negative_prompt, style.family)
    except ValueError as exc:
        raise UserError(str(exc)) from None

    def generate(call):
        try:
            style.check_negatives(negative, call)
            inputs = style.ip_inputs(styles, args.content_prompt, args.content_scale,
                                     do_classifier_free_guidance=args.guidance > 1.0, negative_style_images=negative)
        except ContentSubtractionError as exc:
            raise UserError(str(exc)) from None
        except ValueError as exc:  # e.g. several --style images for SD3.5's one-image adapter
            raise UserError(f"--style / --negative-style: {exc}") from None
        images = style.pipe(prompt=args.prompt, **inputs, **call).images
        report = style.report
        return images, {"targets": sorted(layers_of(report)), "ip_params_held": report.ip_params,
                        "ip_params_all_layers": report.ip_params_all_layers, "ip_adapter_file": style.source,
                        "controls": dict(style.controls)}

    return generate


def _style_aligned(args, pipe):
    """StyleAligned over a batch of prompts; returns ``generate(call) -> (images, sidecar details)``."""
    from instantstyle.processors.methods import (
        StyleAligned,
        apply_method,
        remove_method,
    )

    method = StyleAligned(keys_scale=args.keys_scale, score_shift=args.score_shift, only_self_level=args.only_self_level,
                          share_group_norm=not args.no_shared_norms, share_layer_norm=not args.no_shared_norms,
                          cfg=args.guidance > 1.0,  # diffusers runs CFG as [negatives; positives] when guidance > 1
                          start_at=args.start_at, end_at=args.end_at)

    def generate(call):
        try:
            injection = apply_method(pipe, method)
        except (TypeError, ValueError) as exc:
            raise UserError(f"--method style-aligned: {exc}") from None
        if call["negative_prompt"] is not None:
            call = dict(call, negative_prompt=[call["negative_prompt"]] * len(args.prompt))
        try:
            images = pipe(prompt=list(args.prompt), **call).images
        finally:
            remove_method(pipe, method)
        return images, {"targets": sorted(injection.weights)}

    return generate


def settings_of(args) -> dict:
    """The settings that applied to this run (none of the other method's defaults)."""
    other = [m for m in ONLY_FOR if m != args.method]
    skip = set(NOT_SETTINGS).union(*(ONLY_FOR[m] for m in other), ("resolved_target",))
    settings = {k: v for k, v in vars(args).items() if k not in skip and not callable(v)}
    if args.method == "instantstyle":
        settings["target"] = args.target or args.preset or getattr(args, "resolved_target", "style")
        settings.pop("preset", None)
    return settings


def check_all(args) -> list:
    """Every check that needs no model, in the order a user fixes them; returns the output paths."""
    if bool(args.controlnet) != bool(args.control_image):
        raise UserError("--controlnet and --control-image go together")
    if args.canny and not args.control_image:
        raise UserError("--canny: needs --control-image")
    check_method_arguments(args)
    check_runtime(args)
    check_seed("--seed", args.seed)
    count = len(args.prompt) if args.method == "style-aligned" else 1
    return check_output(args.out, "--out", output_paths(args.out, count))


def stylize(args) -> dict:
    """Run the whole job; returns the sidecar record (also written next to the first image)."""
    import torch

    from instantstyle.kernels import use_backend

    from .canny import canny_edges
    from .loading import (
        load_content_text_encoder,
        load_image_encoder,
        load_pipeline,
        resolve_ip_adapter,
    )

    paths = check_all(args)
    hub = hub_kwargs(args)
    styles = [open_image("--style", p) for p in args.style] if args.method == "instantstyle" else None
    negative = open_image("--negative-style", args.negative_style) if getattr(args, "negative_style", None) else None
    control = open_image("--control-image", args.control_image) if args.control_image else None
    device, dtype = device_and_dtype(args)
    ip_file = resolve_ip_adapter(args, hub) if args.method == "instantstyle" else None

    timings = {}
    start = time.perf_counter()
    pipe = load_pipeline(args, dtype, hub)
    if args.method == "instantstyle":
        encoder, processor = load_image_encoder(args, dtype, hub)
        text_encoder, tokenizer = load_content_text_encoder(args, dtype, hub)
        pipe.to(device)
        generate = _instantstyle(args, styles, pipe, encoder.to(device), processor,
                                 text_encoder.to(device) if text_encoder is not None else None, tokenizer, ip_file, negative)
    else:
        pipe.to(device)
        generate = _style_aligned(args, pipe)
    timings["load_s"] = round(time.perf_counter() - start, 3)

    call = dict(
        negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
        height=args.height, width=args.width, generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    if args.true_cfg_scale is not None:  # Flux only (checked once the pipeline's family is known)
        call["true_cfg_scale"] = args.true_cfg_scale
    if control is not None:
        call["image"] = canny_edges(control) if args.canny else control
    start = time.perf_counter()
    with use_backend(args.backend):
        images, details = generate(call)
    timings["generate_s"] = round(time.perf_counter() - start, 3)

    settings = settings_of(args)
    text = png_text(dict(settings, scheduler=type(pipe.scheduler).__name__))
    for image, path in zip(images, paths):
        save_image(image, path, text)
    from .versions import package_versions

    return {
        "image": paths[0],
        "images": paths,
        "method": args.method,
        "settings": settings,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "backend": args.backend,
        "threads": torch.get_num_threads() if device.startswith("cpu") else None,
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config)},
        **details,
        "versions": package_versions(),
        "timings": timings,
    }


def run(args) -> int:
    record = stylize(args)  # UserError: one line from the CLI, exit 2
    sidecar = sidecar_path(os.path.abspath(args.out))  # a.png.json, also for a batch a-0.png, a-1.png, ...
    write_json(sidecar, record)
    print(f"wrote {', '.join(record['images'])} and {sidecar}", file=sys.stderr)
    return 0
