"""The device kernels registered for the ``qtune::linear_*`` ops: each picks, per call, the fused Triton
kernel or dequantize + ``torch.matmul`` (:mod:`qtune.ops.dispatch` decides from M, the activation's
rows, and the op family and direction).

- fused: ``matmul_<fmt>.py`` (the weight is dequantized tile by tile in registers);
- dequant: the Triton dequantize kernel of ``dequant_<fmt>.py`` writes ``Ŵ`` [N, K] into the dispatch
  workspace of this device and stream (no allocation per call), then cuBLAS computes
  ``y = x Ŵᵀ + b`` (``torch.addmm``) or ``dx = dy Ŵ`` (``torch.mm``) in the activation dtype. The
  workspace is reused by the next call, so nothing dense outlives the call: backward dequantizes again.

Arguments are the ops' (see ``qtune/ops/linear.py``); outputs are in the activation's dtype.
LLM.int8's forward is always its int8 GEMM (``matmul_llm_int8.py``); its grad_input dequantizes
``CB · SCB / 127`` like an int8 weight with one scale per row.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from qtune.ops import dispatch

from .dequant_4bit import dequantize_4bit
from .dequant_affine import check_affine_args, dequantize_affine
from .dequant_gguf import check_gguf_args, dequantize_gguf
from .dequant_gptq import check_gptq_args, dequantize_gptq
from .dequant_int8 import dequantize_int8
from .matmul_4bit import linear_4bit as _fused_4bit
from .matmul_4bit import linear_4bit_grad_input as _fused_4bit_grad
from .matmul_affine import linear_affine as _fused_affine
from .matmul_affine import linear_affine_grad_input as _fused_affine_grad
from .matmul_gguf import linear_gguf as _fused_gguf
from .matmul_gguf import linear_gguf_grad_input as _fused_gguf_grad
from .matmul_gptq import linear_gptq as _fused_gptq
from .matmul_gptq import linear_gptq_grad_input as _fused_gptq_grad
from .matmul_int8 import linear_int8 as _fused_int8
from .matmul_int8 import linear_int8_grad_input as _fused_int8_grad
from .matmul_int8 import linear_llm_int8_grad_input as _fused_llm_int8_grad
from .matmul_llm_int8 import linear_llm_int8 as _llm_int8_gemm


def _rows(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1] if t.shape[-1] else 0


def _dense_forward(x: torch.Tensor, w_into: Callable[[torch.Tensor], torch.Tensor], n: int, k: int,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x Ŵᵀ + b`` with ``Ŵ`` dequantized into the workspace by ``w_into(buffer)``."""
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the weight expects {k}")
    w = w_into(dispatch.workspace((n, k), x.dtype, x.device))
    x2 = x.reshape(-1, k)
    y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(x.dtype), x2, w.t())
    return y.view(*x.shape[:-1], n)


def _dense_grad_input(dy: torch.Tensor, w_into: Callable[[torch.Tensor], torch.Tensor], n: int,
                      k: int) -> torch.Tensor:
    """``dy Ŵ`` with ``Ŵ`` dequantized into the workspace by ``w_into(buffer)``."""
    if dy.shape[-1] != n:
        raise ValueError(f"linear grad_input: grad_out has {dy.shape[-1]} features, the weight has {n} rows")
    w = w_into(dispatch.workspace((n, k), dy.dtype, dy.device))
    return torch.mm(dy.reshape(-1, n), w).view(*dy.shape[:-1], k)


# -- NF4 / FP4 ------------------------------------------------------------------------------------------
def linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                nested_offset: Optional[torch.Tensor], blocksize: int, shape: Sequence[int],
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``qtune::linear_4bit`` on the device: fused or dequantize + cuBLAS by :func:`dispatch.choose`."""
    w = (packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape)
    if dispatch.choose("4bit", "forward", _rows(x), x.device) == "fused":
        return _fused_4bit(x, *w, bias)
    n, k = int(shape[0]), int(shape[1])
    return _dense_forward(x, lambda out: dequantize_4bit(*w, x.dtype, out=out), n, k, bias)


def linear_4bit_grad_input(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                           nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                           nested_offset: Optional[torch.Tensor], blocksize: int,
                           shape: Sequence[int]) -> torch.Tensor:
    """``qtune::linear_4bit_grad_input`` on the device (``dx = dy Ŵ``)."""
    w = (packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape)
    if dispatch.choose("4bit", "grad_input", _rows(grad_out), grad_out.device) == "fused":
        return _fused_4bit_grad(grad_out, *w)
    n, k = int(shape[0]), int(shape[1])
    return _dense_grad_input(grad_out, lambda out: dequantize_4bit(*w, grad_out.dtype, out=out), n, k)


# -- int8 weight-only -----------------------------------------------------------------------------------
def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``qtune::linear_int8`` on the device."""
    if dispatch.choose("int8", "forward", _rows(x), x.device) == "fused":
        return _fused_int8(x, weight, scale, zero, group_size, bias)
    n, k = weight.shape
    return _dense_forward(x, lambda out: dequantize_int8(weight, scale, zero, group_size, x.dtype, out=out), n, k,
                          bias)


def linear_int8_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           zero: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    """``qtune::linear_int8_grad_input`` on the device."""
    if dispatch.choose("int8", "grad_input", _rows(grad_out), grad_out.device) == "fused":
        return _fused_int8_grad(grad_out, weight, scale, zero, group_size)
    n, k = weight.shape
    return _dense_grad_input(
        grad_out, lambda out: dequantize_int8(weight, scale, zero, group_size, grad_out.dtype, out=out), n, k)


# -- LLM.int8 -------------------------------------------------------------------------------------------
def linear_llm_int8(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, threshold: float,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``qtune::linear_llm_int8`` on the device: always the int8 GEMM (the decision is still recorded)."""
    dispatch.choose("llm_int8", "forward", _rows(x), x.device)
    return _llm_int8_gemm(x, weight, scb, threshold, bias)


def linear_llm_int8_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
                               threshold: float) -> torch.Tensor:
    """``qtune::linear_llm_int8_grad_input`` on the device (``dx = dy · CB·SCB/127``)."""
    if dispatch.choose("llm_int8", "grad_input", _rows(grad_out), grad_out.device) == "fused":
        return _fused_llm_int8_grad(grad_out, weight, scb, threshold)
    n, k = weight.shape
    return _dense_grad_input(
        grad_out, lambda out: dequantize_int8(weight, scb.reshape(-1, 1), None, -1, grad_out.dtype, out=out), n, k)


# -- GPTQ -----------------------------------------------------------------------------------------------
def linear_gptq(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int, in_features: int,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``qtune::linear_gptq`` on the device."""
    w = (qweight, qzeros, scales, g_idx, bits, in_features)
    if dispatch.choose("gptq", "forward", _rows(x), x.device) == "fused":
        return _fused_gptq(x, *w, bias)
    n, k = check_gptq_args(*w, "linear_gptq")
    return _dense_forward(x, lambda out: dequantize_gptq(*w, x.dtype, out=out), n, k, bias)


def linear_gptq_grad_input(grad_out: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                           scales: torch.Tensor, g_idx: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``qtune::linear_gptq_grad_input`` on the device."""
    w = (qweight, qzeros, scales, g_idx, bits, in_features)
    if dispatch.choose("gptq", "grad_input", _rows(grad_out), grad_out.device) == "fused":
        return _fused_gptq_grad(grad_out, *w)
    n, k = check_gptq_args(*w, "linear_gptq_grad_input")
    return _dense_grad_input(grad_out, lambda out: dequantize_gptq(*w, grad_out.dtype, out=out), n, k)



# -- GGUF block types (one op family, every type: the kernels specialise on ggml_type) ----------------------
def linear_gguf(x: torch.Tensor, weight: torch.Tensor, ggml_type: int, in_features: int,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``qtune::linear_gguf`` on the device."""
    if dispatch.choose("gguf", "forward", _rows(x), x.device) == "fused":
        return _fused_gguf(x, weight, ggml_type, in_features, bias)
    _, n, k = check_gguf_args(weight, ggml_type, in_features, "linear_gguf")
    return _dense_forward(x, lambda out: dequantize_gguf(weight, ggml_type, in_features, x.dtype, out=out), n, k,
                          bias)


def linear_gguf_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, ggml_type: int,
                           in_features: int) -> torch.Tensor:
    """``qtune::linear_gguf_grad_input`` on the device (``dx = dy Ŵ``)."""
    if dispatch.choose("gguf", "grad_input", _rows(grad_out), grad_out.device) == "fused":
        return _fused_gguf_grad(grad_out, weight, ggml_type, in_features)
    _, n, k = check_gguf_args(weight, ggml_type, in_features, "linear_gguf_grad_input")
    return _dense_grad_input(
        grad_out, lambda out: dequantize_gguf(weight, ggml_type, in_features, grad_out.dtype, out=out), n, k)


# -- affine (float scale and offset per group) --------------------------------------------------------------
def linear_affine(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                  group_size: int, in_features: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``qtune::linear_affine`` on the device."""
    w = (weight, scale, offset, bits, group_size, in_features)
    if dispatch.choose("affine", "forward", _rows(x), x.device) == "fused":
        return _fused_affine(x, *w, bias)
    n, k, _, _ = check_affine_args(*w, "linear_affine")
    return _dense_forward(x, lambda out: dequantize_affine(*w, x.dtype, out=out), n, k, bias)


def linear_affine_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                             offset: torch.Tensor, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """``qtune::linear_affine_grad_input`` on the device (``dx = dy Ŵ``)."""
    w = (weight, scale, offset, bits, group_size, in_features)
    if dispatch.choose("affine", "grad_input", _rows(grad_out), grad_out.device) == "fused":
        return _fused_affine_grad(grad_out, *w)
    n, k, _, _ = check_affine_args(*w, "linear_affine_grad_input")
    return _dense_grad_input(grad_out, lambda out: dequantize_affine(*w, grad_out.dtype, out=out), n, k)
