"""The ``qtune`` operator namespace: one ``torch.library.Library`` that every op is declared in.

Each op is declared once (schema + fake implementation for ``torch.compile``/meta tensors), with the
pure-PyTorch reference registered as the ``default`` kernel (``CompositeExplicitAutograd``), so every
device works. Faster kernels (``kernels/``, Triton) override it per device with
:func:`register_device_kernel`; the results must match the reference.
"""
from __future__ import annotations

import sys

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


# -- why device kernels are missing (for the one warning of the slow path) --------------------------------
_registration_failure: list[str] = []   # the cause, when registering the device kernels raised
_slow_path_warned: set[str] = set()


def note_registration_failure(cause: str) -> None:
    """Record why registering the device kernels failed (``qtune/__init__.py`` calls this)."""
    _registration_failure[:] = [cause]


def registration_failure() -> str | None:
    """The recorded cause of a failed device-kernel registration, or None."""
    return _registration_failure[0] if _registration_failure else None


def slow_path_reason(device_type: str) -> str | None:
    """Why a tensor on ``device_type`` reached a ``qtune::`` reference kernel, and the fix; None when that is
    expected (CPU and meta tensors run the reference or the native CPU kernels by design).

    The reference kernels (dequantize, then a dense matmul, in plain PyTorch) are correct on every
    device, but on a GPU they are several times slower and use far more memory than the Triton kernels.
    """
    if device_type in ("cpu", "meta"):
        return None
    if device_type != "cuda":
        return (f"qtune has no kernels for {device_type!r} tensors: its quantized linear layers run the pure-PyTorch "
                "reference there (dequantize + matmul per call), correct but slow")
    failure = registration_failure()
    if failure is not None:
        cause = f"registering qtune's Triton kernels failed at import ({failure})"
        fix = "install a Triton that qtune supports (see pyproject.toml) or report the error"
    else:
        # the kernels sit above this module: ask the loaded package (``import qtune`` imports it), never import it
        kernels = sys.modules.get("qtune.kernels")
        if kernels is None:
            cause, fix = "qtune.kernels was not imported (importing it failed)", "reinstall qtune"
        else:
            if not kernels.triton_available():
                cause = "Triton is not installed (e.g. aarch64 wheels of torch ship without it)"
                fix = "pip install triton"
            elif not kernels.registered():
                cause = "CUDA was not available when qtune was imported, so its Triton kernels were not registered"
                fix = "import qtune after CUDA is visible, or call qtune.kernels.register()"
            else:
                return None
    return (f"CUDA tensors are running qtune's pure-PyTorch reference kernels (dequantize + matmul per call: correct, "
            f"but slow and memory-hungry): {cause}. Fix: {fix}.")


def warn_slow_path(device_type: str) -> None:
    """Warn once per process and device type when :func:`slow_path_reason` finds a cause."""
    if device_type in _slow_path_warned:
        return
    reason = slow_path_reason(device_type)
    if reason is None:
        return
    _slow_path_warned.add(device_type)
    import warnings

    warnings.warn(reason, RuntimeWarning, stacklevel=3)
