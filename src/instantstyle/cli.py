"""``instantstyle`` command line: one subcommand per module that owns the work.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``,
so this file only wires them together.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

#: (subcommand, module, one-line help)
COMMANDS = [
    ("bench", "instantstyle.bench.cli", "benchmark the fused op against diffusers' math"),
    ("compile-report", "instantstyle.kernels.compile_report", "compile every kernel variant for sm_80/sm_90, no GPU needed"),
    ("tune", "instantstyle.kernels.tune", "measure kernel tiles on this GPU and write the table the launcher reads"),
    ("info", "instantstyle.info", "versions, devices and which attention backend would run"),
    ("blocks", "instantstyle.blocks_cli", "list a UNet's attention modules and what is injected where"),
    ("stylize", "instantstyle.pipelines.stylize_cli", "stylise an image with InstantStyle (style reference + prompt -> PNG)"),
    ("stylize-batch", "instantstyle.pipelines.batch_cli", "stylise a manifest of jobs, data-parallel under accelerate/torchrun"),
    ("video", "instantstyle.pipelines.video_cli", "make a video with Wan I2V/FLF2V, its image branch scaled per block (GIF/MP4)"),
    ("train-adapter", "instantstyle.training.cli", "train an IP-Adapter into chosen blocks only (style by default), on accelerate"),
    ("train-lora", "instantstyle.training.lora_cli", "train a LoRA on registry targets (B-LoRA style/content blocks) with peft"),
]


def _debug_flag(parser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the full traceback of an error (default: one line)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="instantstyle",
        description="Fused decoupled cross-attention for IP-Adapter / InstantStyle.",
    )
    parser.add_argument("--version", action="version", version=f"instantstyle {__version__}")
    _debug_flag(parser, False)
    common = argparse.ArgumentParser(add_help=False)
    _debug_flag(common, argparse.SUPPRESS)  # also after the subcommand, without resetting a --debug before it
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real missing dependency inside the module
                raise
            continue  # subcommand not part of this build
        doc = (module.__doc__ or help_text).strip()
        cmd = sub.add_parser(name, help=help_text, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                             parents=[common])
        module.add_arguments(cmd)
        cmd.set_defaults(run=module.run)
    return parser


def _import_error(exc: BaseException):
    """The ImportError behind ``exc``, if any: libraries re-raise import failures as their
    own errors (diffusers' lazy modules: "Failed to import X because of the following
    error (look up to see its traceback)"), which name neither the module nor the file."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ImportError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_error(exc: BaseException) -> str:
    """One line for an unexpected error.  An import failure names the module that failed
    and the file it came from (a folder in the working directory that shadows an installed
    package shows up here)."""
    text = (str(exc).splitlines() or [""])[0].split(" because of the following error")[0]
    line = f"{type(exc).__name__}: {text}"
    cause = _import_error(exc)
    if cause is not None:
        module = sys.modules.get(cause.name or "")
        where = cause.path or getattr(module, "__file__", None)
        detail = (str(cause).splitlines() or [""])[0]
        found = f"module {cause.name!r} was imported from {where}" if where else f"module {cause.name!r} is not installed"
        said = f"{type(cause).__name__}: {detail}" if cause is not exc else ""
        if not (where and where in detail):  # CPython already names the file of a failed ``from x import y``
            said = f"{said} ({found})" if said else f"({found})"
        line = f"{line}: {said}" if cause is not exc else f"{line} {said}"
    return line


def _error(message: str) -> None:
    print(f"instantstyle: error: {message}", file=sys.stderr)


def main(argv=None) -> int:
    """Run a subcommand.  Exit 2 with one line for a user mistake (as argparse does), 1 with one
    line for anything unexpected; ``--debug`` shows the traceback instead."""
    from instantstyle.pipelines.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `instantstyle`: what can I do?
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        _error(str(exc))
        return 2
    except BrokenPipeError:
        # the reader (e.g. `| head`) went away: not an error; stop writing, and keep Python's
        # own flush at exit from complaining about the closed pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        _error(f"{describe_error(exc)} (run with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
