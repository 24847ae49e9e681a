"""The ``qtune`` command: ``qtune <subcommand> ...`` (also ``python -m qtune`` / ``accelerate launch -m qtune``).

Each subcommand lives in its own module under ``qtune.cli`` and exposes ``add_parser(subparsers)``,
which registers its arguments and sets ``func`` (called with the parsed args; returns an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under qtune.cli
SUBCOMMANDS = {
    "quantize": "quantize",
    "eval": "evaluate",
    "inspect": "inspect",
    "train": "train",
    "plan": "plan",
    "export": "export",
    "env": "env",
}


def build_parser() -> argparse.ArgumentParser:
    from . import one_line_errors

    parser = one_line_errors(argparse.ArgumentParser(prog="qtune",
                                                     description="QLoRA fine-tuning on quantized, frozen base models"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"qtune.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"qtune.cli.{module}":
                raise
            continue  # subcommand not part of this build
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"qtune {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
