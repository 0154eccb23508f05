"""Make a video with a Wan 2.1 I2V/FLF2V pipeline, its native image branch scaled per block
and gated over the schedule (set_image_scale), written as a GIF or an MP4.

--image is the first frame (and the reference the image branch attends to); --last-image
makes it first-last-frame (FLF2V checkpoints).  --scale is one number (every block, or the
blocks --target names) or a comma-separated list, one per block; --start-at/--end-at gate
the named blocks over the schedule.  Next to the video, <video>.json (e.g. cat.gif.json)
records the settings, the per-block scales, frames, fps, seed, backend and versions.

example:
  instantstyle video --model Wan-AI/Wan2.1-I2V-14B-480P-Diffusers --image cat.png \\
      --prompt "a cat walks on the grass" --frames 33 --scale 0.5 --out cat.mp4

GIF needs only Pillow; MP4 needs imageio and imageio-ffmpeg: pip install "instantstyle[video]".
"""
from __future__ import annotations

import json
import os
import sys
import time

from .cli_args import (
    BACKENDS,
    DTYPES,
    check_seed,
    check_start_end,
    device_and_dtype,
    finite,
    hub_kwargs,
)
from .errors import UserError
from .outputs import sidecar_path, write_json
from .video import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    apply_image_scale,
    check_fps,
    check_frames,
    check_size,
    check_video_output,
    generate_frames,
    load_wan_pipeline,
    parse_scale,
    save_video,
)

NOT_SETTINGS = ("run", "command", "debug", "json")


def add_arguments(parser) -> None:
    g = parser.add_argument_group("model (a local folder or a hub id; HF_HUB_OFFLINE=1 uses the local cache only)")
    g.add_argument("--model", required=True, help="diffusers Wan 2.1 I2V or FLF2V pipeline folder or hub id")
    g.add_argument("--cache-dir", help="hub cache folder (default: HF_HUB_CACHE)")
    g = parser.add_argument_group("video")
    g.add_argument("--image", required=True, metavar="IMAGE", help="the first frame, and the image branch's reference")
    g.add_argument("--last-image", metavar="IMAGE", help="the last frame (first-last-frame checkpoints, FLF2V)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"4k+1 frames (default {DEFAULT_FRAMES})")
    g.add_argument("--fps", type=float, default=DEFAULT_FPS, help=f"frames per second of the file (default {DEFAULT_FPS})")
    g.add_argument("--height", type=int, default=DEFAULT_HEIGHT, help=f"multiple of 16 (default {DEFAULT_HEIGHT})")
    g.add_argument("--width", type=int, default=DEFAULT_WIDTH, help=f"multiple of 16 (default {DEFAULT_WIDTH})")
    g.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    g.add_argument("--seed", type=int, default=0, help="an integer in [0, 2**64 - 1] (default 0)")
    g.add_argument("--out", required=True, help="output video (.gif or .mp4); <out>.json is written next to it")
    g.add_argument("--json", action="store_true", help="print the sidecar record on stdout as one JSON line")
    g = parser.add_argument_group("image branch (set_image_scale)")
    g.add_argument("--scale", default="1.0", metavar="S or S0,S1,...",
                   help="scale of the image branch: one number for every (targeted) block, or one per block "
                        "(default 1.0 = diffusers)")
    g.add_argument("--target", action="append", metavar="PATTERN",
                   help="blocks the one-number --scale applies to (a preset such as 'all', or a pattern such as "
                        "blocks.3; repeatable); the others keep 1")
    g.add_argument("--start-at", type=float, default=0.0, help="fraction of the schedule where the scale starts (default 0)")
    g.add_argument("--end-at", type=float, default=1.0, help="fraction of the schedule where it ends (default 1)")
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="attention backend of the fused processors")
    g.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: cores - 1, at most 16)")


def check_all(args) -> str:
    """Every check that needs no model, in the order a user fixes them; returns the output path."""
    from .stylize_cli import open_image

    check_frames("--frames", args.frames)
    check_size("--height", args.height)
    check_size("--width", args.width)
    check_fps("--fps", args.fps)
    finite("--steps", args.steps, 1)
    finite("--guidance", args.guidance, 0)
    check_seed("--seed", args.seed)
    check_start_end(args)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: expected a positive integer, got {args.threads}")
    args.scale = parse_scale("--scale", args.scale)
    if isinstance(args.scale, list) and args.target:
        raise UserError("--scale / --target: a per-block list names every block itself; give one number with --target")
    path = check_video_output(args.out)
    args.images = [open_image("--image", args.image)] + ([open_image("--last-image", args.last_image)]
                                                          if args.last_image else [])
    return path


def make_video(args) -> dict:
    """The whole job; returns the sidecar record (also written next to the video)."""
    import torch

    path = check_all(args)
    if args.dtype is None and (args.device or "").startswith("cuda"):
        args.dtype = "bfloat16"  # Wan's checkpoints are bfloat16; float16 overflows in its FFNs
    device, dtype = device_and_dtype(args)
    timings, start = {}, time.perf_counter()
    pipe = load_wan_pipeline(args.model, dtype, hub_kwargs(args), last_frame=bool(args.last_image))
    target = args.target if args.target is None or len(args.target) > 1 else args.target[0]
    scales = apply_image_scale(pipe, args.scale, target, args.start_at, args.end_at)
    pipe.to(device)
    timings["load_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    frames = generate_frames(pipe, args.images[0], last_image=(args.images[1:] or [None])[0], prompt=args.prompt,
                             negative_prompt=args.negative_prompt, frames=args.frames, height=args.height,
                             width=args.width, steps=args.steps, guidance=args.guidance, seed=args.seed,
                             backend=args.backend)
    timings["generate_s"] = round(time.perf_counter() - start, 3)
    save_video(frames, path, args.fps)
    from .versions import package_versions

    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS + ("images",) and not callable(v)}
    return {
        "video": path, "frames": len(frames), "fps": args.fps, "size": list(frames[0].size), "seed": args.seed,
        "settings": settings, "image_scales": scales, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "backend": args.backend, "threads": torch.get_num_threads() if device.startswith("cpu") else None,
        "pipeline": type(pipe).__name__,
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config)},
        "versions": package_versions(), "timings": timings,
    }


def run(args) -> int:
    record = make_video(args)  # UserError: one line from the CLI, exit 2
    sidecar = sidecar_path(record["video"])
    write_json(sidecar, record)
    if args.json:
        print(json.dumps(dict(record, sidecar=sidecar), default=str, allow_nan=False))
    print(f"wrote {record['video']} ({record['frames']} frames) and {os.path.basename(sidecar)}", file=sys.stderr)
    return 0
