"""Stylise an image with InstantStyle: a style reference, a prompt, a PNG out.

The IP-Adapter goes only into the preset's blocks (SDXL "style" = up_blocks.0.attentions.1),
the reference's content is subtracted in CLIP space (--content-prompt), and fused
decoupled-attention processors run every cross-attention layer.  A JSON sidecar next to
the PNG records every setting, the resolved target modules, versions and timings.

example (SDXL, ip-adapter_sdxl with its ViT-bigG image encoder):
  instantstyle stylize \\
      --model stabilityai/stable-diffusion-xl-base-1.0 \\
      --ip-adapter IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors \\
      --image-encoder IP-Adapter/sdxl_models/image_encoder \\
      --style reference.png --content-prompt "a cat" \\
      --prompt "a dog sitting on a bench" --preset style --scale 1.0 \\
      --out dog.png

Models are loaded from local folders or, if the hub is reachable, hub ids.  Add
--controlnet DIR --control-image IMG [--canny] for spatial control.

--method style-aligned runs StyleAligned instead (shared self-attention, no IP-Adapter):
a batch of prompts whose images share the first image's style.  --out a.png writes
a-0.png, a-1.png, ... (one per --prompt) and a.json:
  instantstyle stylize --method style-aligned --model stabilityai/stable-diffusion-xl-base-1.0 \\
      --prompt "a toy train, minimal origami" --prompt "a toy airplane, minimal origami" \\
      --prompt "a toy car, minimal origami" --out toys.png
"""
from __future__ import annotations

import json
import os
import sys
import time

PRESET_CHOICES = ("style", "layout", "style+layout", "all")
DTYPES = ("float16", "bfloat16", "float32")
METHODS = ("instantstyle", "style-aligned")


class UserError(Exception):
    """A mistake in the command line or the files it names: reported without a traceback."""


def add_arguments(parser) -> None:
    parser.add_argument("--method", choices=METHODS, default="instantstyle",
                        help="instantstyle: IP-Adapter in style blocks (default); style-aligned: a batch of "
                             "prompts sharing the first image's style through self-attention")
    g = parser.add_argument_group("models")
    g.add_argument("--model", required=True, help="diffusers pipeline folder or hub id (SDXL or SD1.5)")
    g.add_argument("--ip-adapter", help="IP-Adapter .bin/.safetensors in the original layout (instantstyle)")
    g.add_argument("--image-encoder", help="CLIP vision model (with projection) folder or hub id (instantstyle)")
    g.add_argument("--controlnet", help="ControlNet folder or hub id (needs --control-image)")
    g.add_argument("--content-text-encoder", metavar="DIR",
                   help="CLIP text model with projection (and its tokenizer) in the image encoder's space, for "
                        "--content-prompt with ViT-H adapters (SD1.5); default: the SDXL pipeline's text_encoder_2")
    g = parser.add_argument_group("style")
    g.add_argument("--style", action="append", metavar="IMAGE", help="style reference (repeatable; instantstyle)")
    g.add_argument("--content-prompt", help="what the reference shows ('a cat'); subtracted from its embedding")
    g.add_argument("--content-scale", type=float, default=0.5, help="how much content to subtract (default 0.5)")
    g.add_argument("--preset", choices=PRESET_CHOICES, default="style", help="blocks to inject into (default style)")
    g.add_argument("--target", action="append", metavar="PATTERN", help="module prefix/glob instead of --preset (repeatable)")
    g.add_argument("--scale", type=float, default=1.0, help="IP-Adapter scale in the target blocks (default 1.0)")
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
    g.add_argument("--control-image", help="control image for --controlnet")
    g.add_argument("--canny", action="store_true", help="turn --control-image into Canny edges first")
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, default=None, help="default: the model's native size")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on cuda, float32 on cpu")
    g.add_argument("--out", required=True, help="output PNG; a .json sidecar is written next to it")


def _require_file(flag: str, path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{flag}: no such file or folder: {path}")


def _from_pretrained(flag: str, load, name: str, **kwargs):
    """Load a model; a missing model becomes a message that says how to work offline."""
    try:
        return load(name, **kwargs)
    except (OSError, ValueError) as exc:
        where = "folder" if os.path.isdir(name) else "hub id"
        raise UserError(
            f"{flag}: could not load {name!r} ({where}): {str(exc).splitlines()[0]}\n"
            "  Without network access, download the model once and pass its local folder "
            "(e.g. from `huggingface-cli download ...`), or set HF_HUB_OFFLINE=1 to use the local cache."
        ) from None


def _load_pipeline(args, torch_dtype):
    from diffusers import AutoPipelineForText2Image, ControlNetModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    kwargs = {"torch_dtype": torch_dtype}
    if args.controlnet:
        kwargs["controlnet"] = _from_pretrained("--controlnet", ControlNetModel.from_pretrained, args.controlnet, torch_dtype=torch_dtype)
    pipe = _from_pretrained("--model", AutoPipelineForText2Image.from_pretrained, args.model, **kwargs)
    if args.method != "instantstyle":
        return pipe, None, None
    encoder = _from_pretrained("--image-encoder", CLIPVisionModelWithProjection.from_pretrained, args.image_encoder, torch_dtype=torch_dtype)
    try:
        processor = CLIPImageProcessor.from_pretrained(args.image_encoder)
    except OSError:  # IP-Adapter's image_encoder folders ship no processor config
        processor = CLIPImageProcessor(size=encoder.config.image_size, crop_size=encoder.config.image_size)
    return pipe, encoder, processor


def _open_image(flag: str, path: str):
    from PIL import Image, UnidentifiedImageError

    _require_file(flag, path)
    try:
        return Image.open(path).convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"{flag}: not an image file: {path}") from None


def _versions() -> dict:
    from instantstyle.info import package_versions

    return package_versions()


def _check_method_arguments(args) -> None:
    """Which flags each --method needs or can't use."""
    if args.method == "instantstyle":
        if args.no_shared_norms:
            raise UserError("--no-shared-norms: used only by --method style-aligned")
        for flag, value in (("--ip-adapter", args.ip_adapter), ("--image-encoder", args.image_encoder), ("--style", args.style)):
            if not value:
                raise UserError(f"{flag}: required with --method instantstyle")
        if len(args.prompt) > 1:
            raise UserError(f"--prompt: --method instantstyle takes one prompt, got {len(args.prompt)}")
        args.prompt = args.prompt[0]
        return
    for flag, value in (("--ip-adapter", args.ip_adapter), ("--image-encoder", args.image_encoder), ("--style", args.style),
                        ("--content-prompt", args.content_prompt), ("--content-text-encoder", args.content_text_encoder),
                        ("--target", args.target)):
        if value:
            raise UserError(f"{flag}: not used by --method {args.method}, which takes its style from the first prompt's image")
    if not 0.0 <= args.only_self_level <= 1.0:
        raise UserError(f"--only-self-level: expected a fraction in [0, 1], got {args.only_self_level}")


def output_paths(out: str, count: int) -> list:
    """``a.png`` for one image; ``a-0.png``, ``a-1.png``, ... for a batch."""
    if count == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(count)]


def _device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))


def _instantstyle(args, styles, pipe, encoder, processor, device, dtype):
    """Wire the pipeline once (InstantStyle); returns ``generate(call) -> (images, sidecar details)``."""
    from instantstyle.pipelines.content import ContentSubtractionError
    from instantstyle.pipelines.instantstyle import InstantStyle

    encoder.to(device)
    text_encoder = tokenizer = None
    if args.content_text_encoder:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        text_encoder = _from_pretrained("--content-text-encoder", CLIPTextModelWithProjection.from_pretrained, args.content_text_encoder,
                                        torch_dtype=dtype).to(device)
        tokenizer = _from_pretrained("--content-text-encoder", CLIPTokenizer.from_pretrained, args.content_text_encoder)
    try:
        style = InstantStyle(pipe, args.ip_adapter, target=args.target or args.preset, scale=args.scale, image_encoder=encoder,
                             image_processor=processor, text_encoder=text_encoder, tokenizer=tokenizer)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"--ip-adapter / --preset / --target: {exc}") from None

    def generate(call):
        try:
            images = style(args.prompt, styles, content_prompt=args.content_prompt, content_scale=args.content_scale, **call).images
        except ContentSubtractionError as exc:
            raise UserError(str(exc)) from None
        report = style.report
        return images, {"targets": sorted(report.adapters[0].layers), "ip_params_held": report.ip_params,
                        "ip_params_all_layers": report.ip_params_all_layers}

    return generate


def _style_aligned(args, pipe):
    """StyleAligned over a batch of prompts; returns ``generate(call) -> (images, sidecar details)``."""
    from instantstyle.processors.methods import StyleAligned, apply_method, remove_method

    method = StyleAligned(keys_scale=args.keys_scale, score_shift=args.score_shift, only_self_level=args.only_self_level,
                          share_group_norm=not args.no_shared_norms, share_layer_norm=not args.no_shared_norms,
                          cfg=args.guidance > 1.0)  # diffusers runs CFG as [negatives; positives] when guidance > 1

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


def stylize(args) -> dict:
    """Run the whole job; returns the sidecar record."""
    import torch

    from instantstyle.pipelines.canny import canny_edges

    if bool(args.controlnet) != bool(args.control_image):
        raise UserError("--controlnet and --control-image go together")
    if args.canny and not args.control_image:
        raise UserError("--canny: needs --control-image")
    _check_method_arguments(args)
    if args.method == "instantstyle":  # user mistakes surface before minutes of model loading
        _require_file("--ip-adapter", args.ip_adapter)
        styles = [_open_image("--style", p) for p in args.style]
    control = _open_image("--control-image", args.control_image) if args.control_image else None
    device, dtype = _device_and_dtype(args)

    timings = {}
    start = time.perf_counter()
    pipe, encoder, processor = _load_pipeline(args, dtype)
    pipe.to(device)
    if args.method == "instantstyle":
        generate = _instantstyle(args, styles, pipe, encoder, processor, device, dtype)
    else:
        generate = _style_aligned(args, pipe)
    timings["load_s"] = round(time.perf_counter() - start, 3)

    call = dict(
        negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
        height=args.height, width=args.width, generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    if control is not None:
        call["image"] = canny_edges(control) if args.canny else control
    start = time.perf_counter()
    images, details = generate(call)
    timings["generate_s"] = round(time.perf_counter() - start, 3)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    paths = [os.path.abspath(p) for p in output_paths(args.out, len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return {
        "image": paths[0],
        "images": paths,
        "method": args.method,
        "settings": {k: v for k, v in vars(args).items() if k not in ("run", "command")},
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        **details,
        "versions": _versions(),
        "timings": timings,
    }


def sidecar_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".json"


def run(args) -> int:
    try:
        record = stylize(args)
    except UserError as exc:
        print(f"instantstyle stylize: error: {exc}", file=sys.stderr)
        return 2
    with open(sidecar_path(args.out), "w") as f:
        json.dump(record, f, indent=1, default=str)
    images = ", ".join(record["images"])
    print(f"wrote {images} and {sidecar_path(args.out)}", file=sys.stderr)
    return 0
