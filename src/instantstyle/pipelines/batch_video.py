"""``stylize-batch --format gif|mp4``: manifest rows made into videos by a Wan 2.1 I2V pipeline.

A row's ``style`` is the video's first frame and the image branch's reference (one image; two,
first and last frame, for a first-last-frame checkpoint); ``scale``/``target`` set the image
branch per block (:func:`set_image_scale`, default target ``all``; a ``scale`` list, one number
per block, names the blocks itself); an optional ``frames`` field overrides --frames.
Everything else (names, seeds, resuming by settings hash, atomic writes inside --out,
sharding, the summary) is the image batch's own.
"""
from __future__ import annotations

import os

from .cli_args import (
    check_runtime,
    check_seed,
    check_start_end,
    check_true_cfg,
    device_and_dtype,
    finite,
)
from .errors import UserError
from .outputs import writable_folder
from .video import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    apply_image_scale,
    check_fps,
    check_frames,
    check_mp4_writer,
    check_size,
    generate_frames,
    load_wan_pipeline,
    save_video,
    takes_last_frame,
)

VIDEO_FORMATS = ("gif", "mp4")
#: image-only flags a video batch refuses rather than ignores
IMAGE_ONLY = ("ip_adapter", "subfolder", "weight_name", "image_encoder", "content_text_encoder", "content_prompt")


def add_video_arguments(parser) -> None:
    g = parser.add_argument_group("video rows (--format gif or mp4, a Wan 2.1 I2V --model)")
    g.add_argument("--frames", type=int, default=None, help=f"4k+1 frames per video (default {DEFAULT_FRAMES}); a row's "
                                                            "'frames' field overrides it")
    g.add_argument("--fps", type=float, default=None, help=f"frames per second of the files (default {DEFAULT_FPS})")


def is_video(args) -> bool:
    return getattr(args, "format", None) in VIDEO_FORMATS


def check_video_batch(args) -> str:
    """The video batch's checks before loading; returns the output folder.  Fills the defaults
    (frames, fps, target ``all``: Wan has no style preset) so the settings hash records them."""
    for flag in IMAGE_ONLY:
        if getattr(args, flag, None):
            raise UserError(f"--{flag.replace('_', '-')}: not used by video rows (--format {args.format}): Wan's image "
                            "branch is part of the model")
    try:
        check_true_cfg(args.true_cfg_scale, None, "wan")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    args.frames = check_frames("--frames", DEFAULT_FRAMES if args.frames is None else args.frames)
    args.fps = check_fps("--fps", DEFAULT_FPS if args.fps is None else args.fps)
    check_size("--height", args.height)
    check_size("--width", args.width)
    finite("--scale", args.scale)
    check_seed("--seed", args.seed)
    check_start_end(args)
    check_runtime(args)
    if not args.target and not args.preset:
        args.preset = "all"
    if args.format == "mp4":
        check_mp4_writer()
    return writable_folder(os.path.abspath(args.out), "--out")


def check_image_batch(args) -> None:
    """Video flags on an image batch are a mistake, not silently ignored."""
    for flag in ("frames", "fps"):
        if getattr(args, flag, None) is not None:
            raise UserError(f"--{flag}: used only by video rows (--format gif or mp4)")


def wire_video(args, state, hub, defaults: dict, effective_settings):
    """Load the Wan pipeline once in this process; returns ``(generate(job, seed), save)``."""
    from .stylize_cli import open_image

    if args.device in (None, "cuda") and state.device.type == "cuda":
        args.device = str(state.device)  # one GPU per process
    if args.dtype is None and state.device.type == "cuda":
        args.dtype = "bfloat16"  # Wan's checkpoints are bfloat16; float16 overflows in its FFNs
    device, dtype = device_and_dtype(args)
    pipe = load_wan_pipeline(args.model, dtype, hub).to(device)
    frame_names = ("the first frame", "the last frame") if takes_last_frame(pipe.transformer.config) else ("the first frame",)

    def generate(job, seed: int):
        row = effective_settings(job, seed, defaults)
        if len(job.style) != len(frame_names):
            raise ValueError(f"style: a video row for this model takes {len(frame_names)} image(s) "
                             f"({' and '.join(frame_names)}), got {len(job.style)}")
        frames = check_frames("frames", row.get("frames", args.frames))
        target = row["target"]
        if isinstance(row["scale"], list):  # one number per block: it names the blocks itself
            if job.target is not None or args.target:
                raise ValueError(f"target: a per-block scale list names every block itself; leave target out, "
                                 f"got {job.target or args.target!r}")
            target = None
        scales = apply_image_scale(pipe, row["scale"], target, args.start_at, args.end_at)
        video = generate_frames(pipe, open_image("style", job.style[0]), prompt=job.prompt,
                                last_image=open_image("style", job.style[1]) if len(job.style) > 1 else None,
                                negative_prompt=row["negative_prompt"], frames=frames, height=args.height or DEFAULT_HEIGHT,
                                width=args.width or DEFAULT_WIDTH, steps=args.steps, guidance=args.guidance, seed=seed,
                                backend=args.backend)
        return video, {"target": row["target"], "scale": row["scale"], "image_scales": scales, "frames": len(video),
                       "fps": args.fps, "backend": args.backend, "scheduler": type(pipe.scheduler).__name__,
                       "device": device, "model": args.model, "pipeline": type(pipe).__name__}

    def save(video, path, record):
        save_video(video, path, args.fps)

    return generate, save
