"""Command-line interface (see :mod:`qtune.cli.main`) and what its subcommands share.

A bad input to any ``qtune`` command ends in exactly one stderr line, ``qtune CMD: error: MESSAGE``:
usage errors too (:func:`one_line_errors`), and arguments are checked before a model is loaded, so no
progress bar precedes the error (:func:`check_positive`, :func:`model_dtype`).
"""
from __future__ import annotations

import argparse
import logging

# peft imports bitsandbytes, whose CPU backend logs at import time, on CPUs with AVX512-BF16, that its optional
# kernels-community kernel is missing. qtune's commands compute with their own kernels; the line is noise on
# every command's stderr (including in front of a one-line error).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report a usage error as one line, ``PROG: error: MESSAGE (see PROG --help)``; exit code 2.

    argparse prints its whole usage block first, which for ``qtune quantize`` is 15 lines.
    """
    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error
    return parser


def check_positive(args: argparse.Namespace, *names: str, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming the flag if an integer argument in ``names`` is set and below ``minimum``."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ {minimum}, got {value}")


def model_dtype(value: str):
    """``--dtype`` of a model: ``"auto"`` or a float dtype name (``float32``, ``bf16``...) as a ``torch.dtype``.

    Raises:
        ValueError: any other value, naming ``--dtype``.
    """
    if value == "auto":
        return value
    from ..formats.base import parse_dtype

    return parse_dtype(value, what="--dtype")
