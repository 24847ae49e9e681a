"""Dequantize operators (packed weight → dense ``[out_features, in_features]``) and the 4-bit block quantizer.

``qtune::dequantize_4bit``, ``qtune::dequantize_int8``, ``qtune::dequantize_gptq``, ``qtune::dequantize_gguf`` and
``qtune::dequantize_affine`` wrap the reference functions of :mod:`qtune.formats`, which define the maths.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..formats import affine, gguf, gptq, int8, nf4
from .library import define


def _dequantize_4bit_ref(packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                         nested_code: Optional[Tensor], nested_offset: Optional[Tensor], blocksize: int,
                         shape: list[int], dtype: torch.dtype) -> Tensor:
    return nf4.dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, nested_absmax=nested_absmax,
                               nested_code=nested_code, nested_offset=nested_offset)


def _dequantize_4bit_fake(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape, dtype):
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(packed.numel() * 2 >= shape[0] * shape[1], lambda: "packed holds fewer than N*K/2 bytes")
    return packed.new_empty(shape, dtype=dtype)


dequantize_4bit = define(
    "dequantize_4bit(Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
    "Tensor? nested_offset, int blocksize, int[] shape, ScalarType dtype) -> Tensor",
    _dequantize_4bit_ref, _dequantize_4bit_fake)


def _dequantize_int8_ref(weight: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int,
                         dtype: torch.dtype) -> Tensor:
    return int8.dequantize_int8(weight, scale, zero, group_size, dtype)


def _dequantize_int8_fake(weight, scale, zero, group_size, dtype):
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
    return weight.new_empty(weight.shape, dtype=dtype)


dequantize_int8 = define(
    "dequantize_int8(Tensor weight, Tensor scale, Tensor? zero, int group_size, ScalarType dtype) -> Tensor",
    _dequantize_int8_ref, _dequantize_int8_fake)


def _dequantize_gptq_ref(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                         in_features: int, dtype: torch.dtype) -> Tensor:
    return gptq.dequantize_gptq(qweight, qzeros, scales, g_idx, bits, in_features, dtype)


def _dequantize_gptq_fake(qweight, qzeros, scales, g_idx, bits, in_features, dtype):
    torch._check(qweight.dtype == torch.int32, lambda: f"qweight must be int32, got {qweight.dtype}")
    return qweight.new_empty((scales.shape[1], in_features), dtype=dtype)


dequantize_gptq = define(
    "dequantize_gptq(Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int bits, int in_features, "
    "ScalarType dtype) -> Tensor",
    _dequantize_gptq_ref, _dequantize_gptq_fake)


def _dequantize_gguf_fake(blocks, ggml_type, in_features, dtype):
    torch._check(blocks.dtype == torch.uint8, lambda: f"GGUF blocks must be uint8, got {blocks.dtype}")
    return blocks.new_empty((blocks.shape[0], in_features), dtype=dtype)


# every GGUF block type through one op: device kernels override it per device and branch on ggml_type
dequantize_gguf = define("dequantize_gguf(Tensor blocks, int ggml_type, int in_features, ScalarType dtype) -> Tensor",
                         gguf.dequantize_gguf, _dequantize_gguf_fake)


def _dequantize_affine_fake(weight, scale, offset, bits, group_size, in_features, dtype):
    torch._check(weight.dtype == torch.uint8, lambda: f"affine codes must be uint8, got {weight.dtype}")
    torch._check(scale.shape == offset.shape, lambda: f"affine scale {scale.shape} and offset {offset.shape} differ")
    return weight.new_empty((weight.shape[0], in_features), dtype=dtype)


dequantize_affine = define("dequantize_affine(Tensor weight, Tensor scale, Tensor offset, int bits, int group_size, "
                           "int in_features, ScalarType dtype) -> Tensor",
                           affine.dequantize_affine, _dequantize_affine_fake)


def _quantize_blocks_4bit_fake(flat, blocksize, code):
    n = flat.numel()
    return flat.new_empty((n + 1) // 2, dtype=torch.uint8), flat.new_empty((n + blocksize - 1) // blocksize)


quantize_blocks_4bit = define("quantize_blocks_4bit(Tensor flat, int blocksize, Tensor code) -> (Tensor, Tensor)",
                              nf4.quantize_blocks_4bit, _quantize_blocks_4bit_fake)


def _quantize_int8_rows_fake(weight):
    return weight.new_empty(weight.shape, dtype=torch.int8), weight.new_empty(weight.shape[0], dtype=torch.float32)


quantize_int8_rows = define("quantize_int8_rows(Tensor weight) -> (Tensor, Tensor)",
                            int8.quantize_int8_rows, _quantize_int8_rows_fake)


def _int8_mm_dequant_fake(acc, sx, scb, bias, dtype, scale=1.0 / (127.0 * 127.0)):
    return acc.new_empty(acc.shape, dtype=dtype)


# scale: 1/127² (qtune) or bitsandbytes' 6.200124e-05 (LLMInt8Config(arithmetic="bitsandbytes"))
int8_mm_dequant = define("int8_mm_dequant(Tensor acc, Tensor sx, Tensor scb, Tensor? bias, ScalarType dtype, "
                         f"float scale={1.0 / (127.0 * 127.0)!r}) -> Tensor",
                         int8.int8_mm_dequant, _int8_mm_dequant_fake)
