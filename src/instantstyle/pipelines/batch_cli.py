"""Stylise every row of a manifest, data-parallel across processes, GPUs and machines.

MANIFEST is JSONL (one object per line) or CSV with one job per row.  Fields: prompt, style
(a path or a list of paths, relative to the manifest; in CSV a JSON list or paths joined by
"|"), and optionally negative_prompt, seed, scale, target, content_prompt, content_scale
and name (the output file stem; default: the row number).  Flags give the defaults of the
optional fields (--seed S gives row i the seed S + i).

  {"prompt": "a dog", "style": "refs/wave.png", "content_prompt": "a wave", "name": "dog-wave"}
  {"prompt": "a cat", "style": ["refs/a.png", "refs/b.png"], "seed": 7, "scale": 0.8, "target": "style+layout"}

One process:        instantstyle stylize-batch jobs.jsonl --out results/ --model ... --ip-adapter ...
All GPUs, one box:  accelerate launch -m instantstyle stylize-batch jobs.jsonl --out results/ ...
                    (or: torchrun --nproc-per-node 8 -m instantstyle stylize-batch ...)
Several machines:   accelerate launch --num_machines 2 --machine_rank R --main_process_ip HOST ...
                    (--out on a shared file system)

Each process loads the pipeline once and takes a fixed slice of the rows; a row's image
depends only on the row and its seed, never on which process ran it.  Re-running the same
command skips rows that are complete (<name>.png + <name>.png.json recording the same
settings), so an interrupted run resumes; files are written atomically, with the umask's mode.
A row whose settings changed since its image was made (the row, a flag, or a style image's
bytes: the sidecar keeps their hash) is redone; with --no-redo it is left as it is and reported
"stale".  A name is a file stem, never a path: one component of letters, digits, space and
. - _ + = , ( ), not starting with ".", at most 200 bytes; nothing is ever written outside --out.
Seeds are integers in [0, 2**64 - 1]; -1 is refused (it does not mean random).

Video rows: --format gif or mp4 with a Wan 2.1 I2V --model; a row's style is its first frame,
scale/target set the image branch per block (default target all; a scale list, one number per
block, names the blocks itself), an optional frames field (4k+1) overrides --frames:
  {"prompt": "a fox runs", "style": "fox.png", "frames": 33, "scale": 0.5}
  {"prompt": "a fox runs", "style": "fox.png", "scale": [1, 1, 0, 0]}

No row stops the run: a failing row (bad name, field or image, a model error) gets
<name>.png.error.json (a row without a usable name only its summary entry, under "row-N") and the
run goes on.  The end: OUT/summary.json (every row: ok, skipped, stale or failed with its reason).

exit status:
  0    every row is ok or already complete
  1    some row failed or is stale (--no-redo); OUT/summary.json lists them
  2    a mistake found before any row ran (a flag, the --out folder, a missing, unreadable or
       empty MANIFEST, a model that does not load): one line "instantstyle: error: ..."
  130  interrupted
"""
from __future__ import annotations

import os
import sys
import time

from .batch import (
    Job,
    effective_settings,
    merge_summary,
    rank_results_path,
    read_manifest,
    remove_stale_temporaries,
    run_shard,
)
from .batch_video import (
    VIDEO_FORMATS,
    add_video_arguments,
    check_image_batch,
    check_video_batch,
    is_video,
    wire_video,
)
from .cli_args import (
    add_control_arguments,
    add_model_arguments,
    add_runtime_arguments,
    check_controls,
    check_runtime,
    check_seed,
    check_true_cfg,
    control_kwargs,
    device_and_dtype,
    finite,
    hub_kwargs,
)
from .errors import UserError
from .outputs import IMAGE_FORMATS, png_text, save_image, writable_folder, write_json
from .stylize_cli import PRESET_CHOICES, open_image


def add_arguments(parser) -> None:
    parser.add_argument("manifest", metavar="MANIFEST", help="jobs: .jsonl (one JSON object per line) or .csv")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (shared by all processes)")
    parser.add_argument("--format", choices=[e[1:] for e in IMAGE_FORMATS] + list(VIDEO_FORMATS), default="png",
                        help="image format (default png); gif or mp4: video rows from a Wan 2.1 I2V --model")
    add_model_arguments(parser)
    g = parser.add_argument_group("defaults of the manifest's optional fields")
    g.add_argument("--seed", type=int, default=0,
                   help="row i without a seed uses SEED + i (default 0); seeds are integers in [0, 2**64 - 1]")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--content-prompt", default=None)
    g.add_argument("--content-scale", type=float, default=0.5)
    g.add_argument("--scale", type=float, default=1.0)
    g.add_argument("--preset", choices=PRESET_CHOICES, default=None, help="default target (default style)")
    g.add_argument("--target", action="append", metavar="PATTERN", help="module prefix/glob instead of --preset")
    g.add_argument("--start-at", type=float, default=0.0)
    g.add_argument("--end-at", type=float, default=1.0)
    add_control_arguments(parser)
    parser.add_argument("--pack", type=int, default=1, metavar="N",
                        help="run up to N rows that share the model settings (target, scale, controls, number of style "
                             "images) in one batched call, each with its own prompt, references and seed (default 1)")
    parser.add_argument("--no-redo", action="store_true",
                        help="leave a row whose settings changed since its image was made as it is (reported "
                             "'stale', exit 1) instead of redoing it")
    add_runtime_arguments(parser)
    add_video_arguments(parser)


def _check(args) -> str:
    """Everything checkable before loading; returns the output folder."""
    if is_video(args):  # Wan I2V rows: their own checks (batch_video)
        return check_video_batch(args)
    check_image_batch(args)
    if not args.ip_adapter:
        raise UserError("--ip-adapter: required")
    if args.target and args.preset:
        raise UserError("--target and --preset: give one (--target names modules, --preset a block preset)")
    finite("--scale", args.scale, 0)
    finite("--content-scale", args.content_scale, 0)
    check_controls(args)
    if args.pack < 1:
        raise UserError(f"--pack: expected a positive integer (rows per batched call), got {args.pack}")
    if args.negative_style:
        open_image("--negative-style", args.negative_style)
    check_seed("--seed", args.seed)
    from .cli_args import check_start_end

    check_start_end(args)
    check_runtime(args)
    return writable_folder(os.path.abspath(args.out), "--out")


def _process_state(args):
    """accelerate's view of the launch (torchrun / accelerate launch / one plain process).  On CPU
    it must be told so, or a torchrun launch looks like one process per rank (gloo otherwise)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=(args.device or "").startswith("cpu") or not torch.cuda.is_available())


def _wire(args, state, hub):
    """Load the pipeline once in this process; returns ``generate(job, seed)``."""
    import torch

    from instantstyle.kernels import use_backend

    from .instantstyle import InstantStyle, layers_of
    from .loading import (
        load_content_text_encoder,
        load_image_encoder,
        load_pipeline,
        resolve_ip_adapter,
    )

    if args.device in (None, "cuda") and state.device.type == "cuda":
        args.device = str(state.device)  # one GPU per process
    if args.threads is None and state.device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.threads = max(1, cores // max(1, state.num_processes))  # processes share the cores
    device, dtype = device_and_dtype(args)
    ip_file = resolve_ip_adapter(args, hub)
    pipe = load_pipeline(argparse_namespace(args, controlnet=None), dtype, hub)
    encoder, processor = load_image_encoder(args, dtype, hub)
    text_encoder, tokenizer = load_content_text_encoder(args, dtype, hub)
    pipe.to(device)
    try:
        # no --target/--preset: the family's default (style on UNets and InstantX Flux, all on XLabs/SD3.5)
        style = InstantStyle(pipe, ip_file, target=args.target or args.preset, scale=args.scale, image_encoder=encoder.to(device),
                             image_processor=processor, tokenizer=tokenizer, image_encoder_folder=None,
                             text_encoder=text_encoder.to(device) if text_encoder is not None else None,
                             start_at=args.start_at, end_at=args.end_at, **control_kwargs(args))
    except (ValueError, TypeError, KeyError, NotImplementedError, FileNotFoundError) as exc:
        raise UserError(f"--ip-adapter / --preset / --target / controls: {exc}") from None
    args.resolved_target = style.target
    if style.family != "flux":  # Flux: each row's negative prompt decides (run_rows)
        try:
            check_true_cfg(args.true_cfg_scale, args.negative_prompt, style.family)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    defaults = defaults_of(args)
    scheduler = type(pipe.scheduler).__name__

    def run_rows(jobs: list, seeds: list) -> list:
        """One pipeline call for ``jobs`` (one, or a pack sharing ``pack_key``): ``[(image, details)]``."""
        rows = [effective_settings(j, s, defaults) for j, s in zip(jobs, seeds)]  # what each sidecar's hash covers
        first, one = rows[0], len(jobs) == 1
        if isinstance(first["scale"], list):
            raise ValueError("scale: a per-block list is for video rows (--format gif or mp4); an image row takes "
                             f"one number, got {first['scale']}")
        styles = [[open_image("style", p) for p in j.style] for j in jobs]
        negatives = [open_image("negative_style", r["negative_style"]) if r.get("negative_style") else None for r in rows]
        target = first["target"]
        if first.get("weight_type") and jobs[0].target is None and not (args.target or args.preset):
            target = "all"  # no target asked for: every module the weight type weights (as stylize)
        if style.family == "flux":
            check_true_cfg(args.true_cfg_scale, first["negative_prompt"], style.family)  # a pack shares whether it has one
        style.configure_all(target, first["scale"], **control_kwargs(first))
        per_row = {"prompt": [j.prompt for j in jobs], "style_images": styles, "negative_style_images": negatives,
                   "content_prompt": [r["content_prompt"] for r in rows], "content_scale": [r["content_scale"] for r in rows],
                   "negative_prompt": None if first["negative_prompt"] is None else [r["negative_prompt"] for r in rows],
                   "generator": [torch.Generator(device="cpu").manual_seed(s) for s in seeds]}
        if one:  # the one row's values, not lists of one
            per_row = {k: v if v is None else v[0] for k, v in per_row.items()}
        if args.true_cfg_scale is not None:
            per_row["true_cfg_scale"] = args.true_cfg_scale
        with use_backend(args.backend):
            images = style(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                           width=args.width, **per_row).images
        details = {"target": style.target, "scale": style.scale, "targets": sorted(layers_of(style.report)),
                   "controls": dict(style.controls), "backend": args.backend, "scheduler": scheduler, "device": device,
                   "model": args.model, "ip_adapter": args.ip_adapter}
        return [(image, dict(details)) for image in images]

    def generate(job: Job, seed: int):
        return run_rows([job], [seed])[0]

    generate.many = run_rows  # --pack: several rows per call
    return generate


#: run-wide flags that decide every row's image, so a change to one redoes the rows (device,
#: backend and threads choose how it runs, not what is asked for, and are left out)
RUN_SETTINGS = ("model", "ip_adapter", "subfolder", "weight_name", "image_encoder", "content_text_encoder", "steps",
                "guidance", "height", "width", "dtype", "start_at", "end_at")


#: in a row's settings only when set, so rows made before they existed keep their hash:
#: video runs' frames and fps, Flux's true CFG
OPTIONAL_SETTINGS = ("frames", "fps", "true_cfg_scale")


#: the settings every row of one packed call must share (the rest is per row in one call)
PER_ROW_IN_A_PACK = ("prompt", "negative_prompt", "seed", "style", "content_prompt", "content_scale", "negative_style")


def pack_key(job: Job, settings: dict) -> str:
    """Rows with equal keys can share one batched call (``--pack``)."""
    import json

    shared = {k: v for k, v in settings.items() if k not in PER_ROW_IN_A_PACK}
    return json.dumps([shared, len(job.style), settings.get("negative_prompt") is None], sort_keys=True, default=str)


def defaults_of(args) -> dict:
    """The flags' side of every row's effective settings (see ``batch.effective_settings``)."""
    negative = getattr(args, "negative_style", None)
    target = args.target or args.preset or getattr(args, "resolved_target", "style")  # set by _wire once loaded
    return {"negative_prompt": args.negative_prompt, "scale": args.scale, "target": target,
            "content_prompt": args.content_prompt, "content_scale": args.content_scale,
            **control_kwargs(args), "negative_style": os.path.abspath(negative) if negative else None,
            **{k: getattr(args, k, None) for k in RUN_SETTINGS},
            **{k: getattr(args, k) for k in OPTIONAL_SETTINGS if getattr(args, k, None) is not None}}


def argparse_namespace(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


def run(args) -> int:
    from tqdm import tqdm

    out_dir = _check(args)
    jobs = read_manifest(args.manifest)
    state = _process_state(args)
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        remove_stale_temporaries(out_dir)  # a killed run's temporaries; nothing is writing yet
    state.wait_for_everyone()
    with state.split_between_processes(jobs) as mine:  # contiguous, deterministic slices
        mine = list(mine)
    started = time.perf_counter()
    if is_video(args):
        generate, save_video_row = wire_video(args, state, hub_kwargs(args), defaults_of(args), effective_settings)
    else:
        generate = _wire(args, state, hub_kwargs(args))
    ext = "." + args.format
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "command", "debug") and not callable(v)}

    def save_image_row(image, path, record):
        save_image(image, path, png_text(dict(record["settings"], scheduler=record.get("scheduler"),
                                              backend=args.backend)))

    save = save_video_row if is_video(args) else save_image_row

    with tqdm(total=len(mine), desc=f"stylize-batch (rank 0 of {world})", unit="row", file=sys.stderr,
              disable=not state.is_main_process, dynamic_ncols=True) as bar:
        results = run_shard(mine, out_dir, ext, args.seed, rank, generate, save, tick=lambda: bar.update(1),
                            pack=getattr(args, "pack", 1), generate_many=getattr(generate, "many", None), pack_key=pack_key,
                            defaults=defaults_of(args), redo=not args.no_redo)
    write_json(rank_results_path(out_dir, rank), [vars(r) for r in results])
    state.wait_for_everyone()
    bad = 0
    if state.is_main_process:
        summary = merge_summary(out_dir, world, len(jobs), settings)
        bad = summary["failed"] + summary["stale"] + len(summary.get("ranks_without_results", ()))
        print(f"stylize-batch: {summary['ok']} written, {summary['skipped']} already complete, {summary['failed']} failed"
              + (f", {summary['stale']} stale (--no-redo)" if summary["stale"] else "")
              + f" ({world} process(es), {time.perf_counter() - started:.1f} s); {os.path.join(out_dir, 'summary.json')}",
              file=sys.stderr)
        for row in summary["failed_rows"] + summary["stale_rows"]:
            print(f"  row {row['index']} ({row['name']}): {row['reason']}", file=sys.stderr)
        if summary.get("ranks_without_results"):
            print(f"  process(es) {summary['ranks_without_results']} wrote no results: their rows are missing",
                  file=sys.stderr)
    state.wait_for_everyone()
    return 1 if bad else 0
