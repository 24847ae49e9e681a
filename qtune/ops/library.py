"""The ``qtune`` operator namespace: one ``torch.library.Library`` that every op is declared in.

Each op is declared once (schema + fake implementation for ``torch.compile``/meta tensors), with the
pure-PyTorch reference registered as the ``default`` kernel (``CompositeExplicitAutograd``), so every
device works. Faster kernels (``kernels/``, Triton) override it per device with
:func:`register_device_kernel`; the results must match the reference.
"""
from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("qtune", "DEF")


def define(schema: str, reference: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Declare ``qtune::<schema>`` with its reference (default) and fake implementations."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"qtune::{name}", fake, lib=LIB)
    return getattr(torch.ops.qtune, name).default


def register_device_kernel(op_name: str, device_type: str, fn: Callable) -> None:
    """Override the reference of ``qtune::op_name`` for ``device_type`` (e.g. ``"cuda"``)."""
    torch.library.register_kernel(f"qtune::{op_name}", device_type, fn, lib=LIB)
