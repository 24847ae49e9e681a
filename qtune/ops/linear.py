"""Quantized linear operators and their autograd rule.

For every format ``F`` two ops are declared:

- ``qtune::linear_F(Tensor x, <weight args>, Tensor? bias) -> Tensor`` computes ``y = x Ŵᵀ + b`` with
  ``Ŵ`` the dequantized weight [N, K]; ``x`` is (..., K) and ``y`` (..., N), both in ``x.dtype``.
- ``qtune::linear_F_grad_input(Tensor grad_out, <weight args>) -> Tensor`` computes ``dx = dy Ŵ``.

Autograd (``y = x Ŵᵀ + b``)::

    dx = dy Ŵ            (re-dequantized from the packed tensors in backward, never stored)
    db = Σ_rows dy       (only when the bias requires grad)
    dŴ = none            (the quantized weight is frozen)

The context saves the *packed* tensors, so a layer's backward costs no memory beyond its quantized
weight. The reference kernels below dequantize then call a dense matmul; ``kernels/`` registers Triton
kernels for CUDA against the same ops (fused, or dequantize + cuBLAS by problem size: see
:mod:`qtune.ops.dispatch`). A CUDA tensor that reaches a reference kernel (Triton missing, registration
failed, CUDA not visible at import) triggers one warning per process naming the cause and the fix.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats.int8 import llm_int8_linear
from . import dequantize as dq
from .library import define, warn_slow_path

WEIGHT_SCHEMAS = {
    "4bit": "Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
            "Tensor? nested_offset, int blocksize, int[] shape",
    "int8": "Tensor weight, Tensor scale, Tensor? zero, int group_size",
    "llm_int8": "Tensor weight, Tensor scb, float threshold",
    "gptq": "Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int bits, int in_features",
}

# weight args -> dense [N, K] in ``dtype`` (through the dequantize ops, so device kernels apply)
_DEQUANT: dict[str, Callable[..., Tensor]] = {
    "4bit": lambda *w, dtype: dq.dequantize_4bit(*w, dtype),
    "int8": lambda *w, dtype: dq.dequantize_int8(*w, dtype),
    "llm_int8": lambda weight, scb, threshold, dtype: dq.dequantize_int8(weight, scb.view(-1, 1), None, -1, dtype),
    "gptq": lambda *w, dtype: dq.dequantize_gptq(*w, dtype),
}

# weight args -> (out_features, in_features), usable on fake tensors
_SHAPE: dict[str, Callable[..., tuple[int, int]]] = {
    "4bit": lambda *w: (w[7][0], w[7][1]),
    "int8": lambda *w: tuple(w[0].shape),
    "llm_int8": lambda *w: tuple(w[0].shape),
    "gptq": lambda *w: (w[2].shape[1], w[5]),
}


def dequantize(fmt: str, weight_args: tuple, dtype: torch.dtype) -> Tensor:
    """Dense [N, K] weight of ``dtype`` from a format's weight args."""
    return _DEQUANT[fmt](*weight_args, dtype=dtype)


def _reference_linear(fmt: str) -> Callable:
    def linear(x: Tensor, *args) -> Tensor:
        warn_slow_path(x.device.type)
        *w, bias = args
        if fmt == "llm_int8":
            weight, scb, threshold = w
            return llm_int8_linear(x, weight, scb, threshold, bias, mm_dequant=dq.int8_mm_dequant)
        return F.linear(x, dequantize(fmt, tuple(w), x.dtype), None if bias is None else bias.to(x.dtype))
    return linear


def _reference_grad_input(fmt: str) -> Callable:
    def grad_input(grad_out: Tensor, *w) -> Tensor:
        warn_slow_path(grad_out.device.type)
        return torch.matmul(grad_out, dequantize(fmt, tuple(w), grad_out.dtype))
    return grad_input


def _fake_linear(fmt: str) -> Callable:
    def fake(x: Tensor, *args) -> Tensor:
        *w, bias = args
        n, k = _SHAPE[fmt](*w)
        torch._check(x.shape[-1] == k, lambda: f"linear_{fmt}: x has {x.shape[-1]} features, weight expects {k}")
        return x.new_empty((*x.shape[:-1], n))
    return fake


def _fake_grad_input(fmt: str) -> Callable:
    def fake(grad_out: Tensor, *w) -> Tensor:
        n, k = _SHAPE[fmt](*w)
        return grad_out.new_empty((*grad_out.shape[:-1], k))
    return fake


def _setup_context(ctx, inputs, output) -> None:
    x, *w, bias = inputs
    # keep the packed tensors (not a dense copy); plain args ride along on ctx
    ctx.tensor_slots = [isinstance(a, Tensor) for a in w]
    ctx.plain_args = [None if t else a for a, t in zip(w, ctx.tensor_slots)]
    ctx.save_for_backward(*[a for a in w if isinstance(a, Tensor)])
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(fmt: str, grad_op: Callable) -> Callable:
    def backward(ctx, grad_out: Tensor):
        saved = iter(ctx.saved_tensors)
        w = [next(saved) if t else a for a, t in zip(ctx.plain_args, ctx.tensor_slots)]
        grad_x = grad_op(grad_out, *w) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[-1]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return (grad_x, *([None] * len(w)), grad_b)
    return backward


LINEAR_OPS: dict[str, torch._ops.OpOverload] = {}
GRAD_INPUT_OPS: dict[str, torch._ops.OpOverload] = {}

for _fmt, _schema in WEIGHT_SCHEMAS.items():
    GRAD_INPUT_OPS[_fmt] = define(f"linear_{_fmt}_grad_input(Tensor grad_out, {_schema}) -> Tensor",
                                  _reference_grad_input(_fmt), _fake_grad_input(_fmt))
    LINEAR_OPS[_fmt] = define(f"linear_{_fmt}(Tensor x, {_schema}, Tensor? bias) -> Tensor",
                              _reference_linear(_fmt), _fake_linear(_fmt))
    torch.library.register_autograd(f"qtune::linear_{_fmt}", _backward(_fmt, GRAD_INPUT_OPS[_fmt]),
                                    setup_context=_setup_context)

# LLM.int8 with bitsandbytes' own arithmetic (fp16 cast of the activations, its epilogue constants): the
# layers of checkpoints bitsandbytes wrote compute what bitsandbytes computes. Its spec is
# ``llm_int8_linear(..., arithmetic="bitsandbytes")``; it runs as torch ops on every device (the int8 GEMM
# is ``torch._int_mm`` on CUDA, as in bitsandbytes' default backend), so no Triton kernel overrides it.
# Backward is LLM.int8's (``dx = dy · CB·SCB/127``), with its device kernels.
_BNB = "llm_int8_bnb"
_DEQUANT[_BNB], _SHAPE[_BNB] = _DEQUANT["llm_int8"], _SHAPE["llm_int8"]


def _bnb_llm_int8(x: Tensor, weight: Tensor, scb: Tensor, threshold: float, bias: Tensor | None) -> Tensor:
    return llm_int8_linear(x, weight, scb, threshold, bias, mm_dequant=dq.int8_mm_dequant, arithmetic="bitsandbytes")


GRAD_INPUT_OPS[_BNB] = GRAD_INPUT_OPS["llm_int8"]
LINEAR_OPS[_BNB] = define(f"linear_{_BNB}(Tensor x, {WEIGHT_SCHEMAS['llm_int8']}, Tensor? bias) -> Tensor",
                          _bnb_llm_int8, _fake_linear(_BNB))
torch.library.register_autograd(f"qtune::linear_{_BNB}", _backward(_BNB, GRAD_INPUT_OPS[_BNB]),
                                setup_context=_setup_context)


def quant_linear(fmt: str, x: Tensor, weight_args: tuple, bias: Tensor | None) -> Tensor:
    """``y = x Ŵᵀ + b`` through ``qtune::linear_<fmt>`` (differentiable in ``x`` and ``bias``)."""
    return LINEAR_OPS[fmt](x, *weight_args, bias)
