"""Triton kernels for qtune's operators on CUDA (installed as ``qtune.kernels``).

One file per kernel; :func:`register` registers them for ``"cuda"`` against the ``qtune::`` ops:

==========================  ==========================================================================
file                        ops it implements on CUDA
==========================  ==========================================================================
``dequant_4bit.py``         ``qtune::dequantize_4bit``  (NF4/FP4, fused double-quant absmax)
``dequant_int8.py``         ``qtune::dequantize_int8``  (absmax per row/group, zero-point)
``dequant_gptq.py``         ``qtune::dequantize_gptq``  (2/3/4/8-bit, ``g_idx`` act-order)
``dequant_gguf.py``         ``qtune::dequantize_gguf``  (GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K blocks)
``dequant_affine.py``       ``qtune::dequantize_affine``  (2/3/4/8-bit codes, fp16 scale and offset per group)
``matmul_4bit.py``          ``qtune::linear_4bit``, ``qtune::linear_4bit_grad_input``
``matmul_gptq.py``          ``qtune::linear_gptq``, ``qtune::linear_gptq_grad_input``
``matmul_gguf.py``          ``qtune::linear_gguf``, ``qtune::linear_gguf_grad_input`` (every GGUF type)
``matmul_affine.py``        ``qtune::linear_affine``, ``qtune::linear_affine_grad_input`` (2/3/4/8 bits, groups
                            32/64/128)
``matmul_int8.py``          ``qtune::linear_int8``, ``qtune::linear_int8_grad_input``,
                            ``qtune::linear_llm_int8_grad_input``
``matmul_llm_int8.py``      ``qtune::linear_llm_int8``  (int8×int8→int32 GEMM + fused scaling epilogue,
                            16-bit outlier columns)
``routing.py``              what is registered for every ``qtune::linear_*`` op: the fused kernel
                            above or dequantize + cuBLAS, per call (:mod:`qtune.ops.dispatch`)
==========================  ==========================================================================

The fused linear kernels never write the dequantized weight to global memory: tiles are dequantized
in registers and fed to ``tl.dot``. What is registered for the linear ops is ``routing.py``: per call it
runs the fused kernel or dequantize + cuBLAS, as :mod:`qtune.ops.dispatch` decides from the problem
size. The autograd rule of ``qtune::linear_<fmt>`` calls ``linear_<fmt>_grad_input`` in backward, so
both directions go through the device kernels.

Importing this package is always safe: without Triton, or without a CUDA device, :func:`register`
registers nothing and qtune keeps its reference (pure PyTorch) kernels. Nothing here imports Triton
until it is needed; the kernel wrappers (e.g. ``qtune.kernels.linear_4bit``, always the fused kernel,
whatever the dispatch policy) are loaded on first access, and run on CPU tensors when
``TRITON_INTERPRET=1`` was set before Triton was imported.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any

from qtune.ops import library as _library

# public wrapper -> module that defines it
_WRAPPERS = {
    "dequantize_4bit": "dequant_4bit",
    "dequantize_int8": "dequant_int8",
    "dequantize_gptq": "dequant_gptq",
    "dequantize_gguf": "dequant_gguf",
    "dequantize_affine": "dequant_affine",
    "linear_4bit": "matmul_4bit",
    "linear_4bit_grad_input": "matmul_4bit",
    "linear_gptq": "matmul_gptq",
    "linear_gptq_grad_input": "matmul_gptq",
    "linear_gguf": "matmul_gguf",
    "linear_gguf_grad_input": "matmul_gguf",
    "linear_affine": "matmul_affine",
    "linear_affine_grad_input": "matmul_affine",
    "linear_int8": "matmul_int8",
    "linear_int8_grad_input": "matmul_int8",
    "linear_llm_int8_grad_input": "matmul_int8",
    "linear_llm_int8": "matmul_llm_int8",
}

# qtune op name -> the module whose function of the same name is registered for it: the dequantize
# wrappers themselves, and routing.py's dispatching wrappers for the linear ops
OPS = {name: ("routing" if name.startswith("linear_") else module) for name, module in _WRAPPERS.items()}

_registered: list[str] = []
_registered_devices: list[str] = []


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (the kernels need it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def register(force: bool = False, *, device: str = "cuda", _testing: bool = False) -> list[str]:
    """Register the Triton kernels for ``"cuda"`` against the ``qtune::`` ops (idempotent).

    Nothing is registered without Triton, or without a CUDA device unless ``force`` (registering is
    harmless there: a CUDA kernel only ever runs on CUDA tensors). Every kernel module is imported
    before the first op is registered, so a Triton too old for them (an ``ImportError`` or
    ``AttributeError`` at import) leaves every op on its reference, never half the ops on each.

    Args:
        force: register without a CUDA device.
        device: ``"cuda"``; ``"cpu"`` only with ``_testing=True``.
        _testing: **test-only hook**: with ``device="cpu"`` and ``TRITON_INTERPRET=1`` (set before Triton
            was imported) the Triton wrappers are registered for CPU tensors, so that a test runs the
            real chain ``torch.ops.qtune.*`` → dispatch → Triton kernel on CPU. The CPU reference (and
            the native CPU kernels) are overridden for the rest of the process: never in user code.

    Returns:
        The op names registered by this process (empty when the reference kernels stay in use).

    Raises:
        ValueError: ``device="cpu"`` without ``_testing``, or without the interpreter.
    """
    if device != "cuda":
        if device != "cpu" or not _testing:
            raise ValueError(f"register(device={device!r}): only 'cuda' (or 'cpu' with _testing=True, for tests)")
        if device in _registered_devices:
            return list(_registered)
        if not triton_available():
            raise ValueError("register(device='cpu', _testing=True) needs Triton")
        from ._common import INTERPRET
        if not INTERPRET:
            raise ValueError("register(device='cpu', _testing=True) needs TRITON_INTERPRET=1 set before Triton "
                             "was imported")
    # CUDA first: on a CPU-only machine `import qtune` then never pays for importing Triton
    elif "cuda" in _registered_devices or not (force or cuda_available()) or not triton_available():
        return list(_registered)
    modules = {name: importlib.import_module(f"{__name__}.{name}") for name in {*_WRAPPERS.values(), "routing"}}
    fns = {op: getattr(modules[mod], op) for op, mod in OPS.items()}
    for op_name, fn in fns.items():
        _library.register_device_kernel(op_name, device, fn)
        if op_name not in _registered:
            _registered.append(op_name)
    _registered_devices.append(device)
    return list(_registered)


def registered() -> list[str]:
    """The op names this process registered device kernels for."""
    return list(_registered)


def __getattr__(name: str) -> Any:
    # Kernel wrappers and kernel modules load lazily: importing qtune must not import Triton.
    if name in _WRAPPERS:
        if not triton_available():
            raise AttributeError(f"qtune.kernels.{name} needs Triton, which is not importable here")
        return getattr(importlib.import_module(f"{__name__}.{_WRAPPERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["register", "registered", "triton_available", "cuda_available", "OPS", *_WRAPPERS]
