"""``instantstyle`` command line: one subcommand per module that owns the work.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``,
so this file only wires them together.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: (subcommand, module, one-line help)
COMMANDS = [
    ("bench", "instantstyle.bench.cli", "benchmark the fused op against diffusers' math"),
    ("compile-report", "instantstyle.kernels.compile_report", "compile every kernel variant for sm_80/sm_90, no GPU needed"),
    ("info", "instantstyle.info", "versions, devices and which attention backend would run"),
    ("blocks", "instantstyle.processors.blocks_cli", "list a UNet's attention modules and what is injected where"),
    ("stylize", "instantstyle.pipelines.stylize_cli", "stylise an image with InstantStyle (style reference + prompt -> PNG)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instantstyle",
        description="Fused decoupled cross-attention for IP-Adapter / InstantStyle.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real missing dependency inside the module
                raise
            continue  # subcommand not part of this build
        doc = (module.__doc__ or help_text).strip()
        cmd = sub.add_parser(name, help=help_text, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
