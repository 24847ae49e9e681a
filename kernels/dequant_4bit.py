"""NF4/FP4 dequantization kernel (``qtune::dequantize_4bit`` on CUDA).

Maths (the spec is :func:`qtune.formats.nf4.dequantize_4bit`): the weight is the row-major flat
sequence ``e = n·K + k`` of ``N·K`` codes, two per byte, the first in the high nibble, with one absmax
per ``blocksize`` consecutive elements::

    W[e] = code[nibble(e)] · a[e // blocksize]                       (fp32 product, then cast)
    a[b] = nested_code[absmax_u8[b]] · nested_absmax[b // 256] + nested_offset      (double quant)

Each program decodes ``BLOCK`` bytes (one 128-bit load per thread) as a [rows, bytes] tile whose rows
each lie in one absmax block (power-of-two block sizes; any other even size gathers the absmax per
byte), looks the nibbles up in the code table held on chip (``tl.gather``), and writes both nibbles
interleaved (``tl.join``) with 128-bit stores. Double quantization is fused: the 8-bit absmax is
decoded in registers, never written out. The kernel is compiled without FMA contraction, so its fp32
arithmetic (a product, then a sum) is exactly the reference's, bit for bit.

Memory traffic per weight element: 0.5 B packed + 4/blocksize B absmax (or 1/blocksize + 4/(256·blocksize)
with double quant) read, plus 2 B (fp16/bf16) or 4 B (fp32) written: 2.56 B for NF4 → fp16 at
blocksize 64. The 16-entry code table is on chip; the 256-entry nested map stays in L1.

Backward: none. Dequantization takes no differentiable input (the packed weight is frozen); the
quantized linear layers differentiate through ``qtune::linear_4bit_grad_input`` (``matmul_4bit.py``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import check_device, config, launch, output_buffer

CONFIGS = [  # BLOCK bytes per program: 16 per thread = one 128-bit load
    config(BLOCK=2048, num_warps=4, num_stages=1),
    config(BLOCK=4096, num_warps=8, num_stages=1),
    config(BLOCK=8192, num_warps=8, num_stages=1),
]


@triton.jit
def load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, blk, mask,
                DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of blocks ``blk`` (any shape); with double quant, decoded from its 8-bit code."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        return (tl.load(nested_code_ptr + q).to(tl.float32)
                * tl.load(nested_absmax_ptr + blk // 256, mask=mask, other=0).to(tl.float32) + nested_offset)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.float32)


@triton.jit
def _dequant_4bit_kernel(
    # pointers
    packed_ptr,         # uint8 [n_bytes], high nibble first
    absmax_ptr,         # fp32 [n_blocks], or uint8 [n_blocks] with DOUBLE_QUANT
    code_ptr,           # fp32 [16]
    nested_absmax_ptr,  # fp32 [ceil(n_blocks / 256)]   (DOUBLE_QUANT only)
    nested_code_ptr,    # fp32 [256]                     (DOUBLE_QUANT only)
    nested_offset_ptr,  # fp32 []                        (DOUBLE_QUANT only)
    out_ptr,            # [n_elements] of the output dtype
    # sizes
    n_elements,
    n_bytes,            # ceil(n_elements / 2)
    # meta-parameters
    BLOCKSIZE: tl.constexpr,      # elements per absmax block (even)
    DOUBLE_QUANT: tl.constexpr,
    BLOCK: tl.constexpr,          # bytes per program (2·BLOCK outputs), a power of two
):
    pid = tl.program_id(0).to(tl.int64)
    table = tl.load(code_ptr + tl.arange(0, 16)).to(tl.float32)  # kept on chip by tl.gather
    nested_offset = 0.0
    if DOUBLE_QUANT:
        nested_offset = tl.load(nested_offset_ptr).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if BLOCKSIZE & (BLOCKSIZE - 1) == 0:
        # power-of-two blocks: a [ROWS, SEG] tile whose rows each lie in one block -> one absmax per row
        SEG: tl.constexpr = BLOCKSIZE // 2 if BLOCKSIZE // 2 < BLOCK else BLOCK
        ROWS: tl.constexpr = BLOCK // SEG
        row0 = pid * BLOCK + tl.arange(0, ROWS) * SEG                # first byte of each row
        offs = row0[:, None] + tl.arange(0, SEG)[None, :]
        byte = tl.load(packed_ptr + offs, mask=offs < n_bytes, other=0).to(tl.int32)
        flat = tl.reshape(byte, (BLOCK,))
        hi = tl.reshape(tl.gather(table, flat >> 4, 0), (ROWS, SEG))
        lo = tl.reshape(tl.gather(table, flat & 15, 0), (ROWS, SEG))
        scale = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, (2 * row0) // BLOCKSIZE,
                            row0 < n_bytes, DOUBLE_QUANT)[:, None]
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        byte = tl.load(packed_ptr + offs, mask=offs < n_bytes, other=0).to(tl.int32)
        hi = tl.gather(table, byte >> 4, 0)
        lo = tl.gather(table, byte & 15, 0)
        # both nibbles of a byte share a block: 2·offs is even and BLOCKSIZE is even
        scale = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, (2 * offs) // BLOCKSIZE,
                            offs < n_bytes, DOUBLE_QUANT)
    w = tl.reshape(tl.join((hi * scale).to(dtype), (lo * scale).to(dtype)), (2 * BLOCK,))
    offs_out = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + offs_out, w, mask=offs_out < n_elements)


_autotuned = triton.autotune(configs=CONFIGS, key=["n_elements", "BLOCKSIZE", "DOUBLE_QUANT"])(_dequant_4bit_kernel)


def _grid(n_elements: int):
    return lambda meta: (triton.cdiv((n_elements + 1) // 2, meta["BLOCK"]),)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                    nested_offset: Optional[torch.Tensor], blocksize: int, shape: Sequence[int],
                    dtype: torch.dtype, *, config: Optional[dict] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense NF4/FP4 weight; the CUDA kernel of ``qtune::dequantize_4bit`` (same arguments).

    Args:
        packed: uint8 (or any storage dtype holding the same bytes), ceil(N·K/2) bytes in any view.
        absmax: fp32 [n_blocks], or uint8 [n_blocks] with the three ``nested_*`` tensors.
        code: fp32 [16]. blocksize: elements per block. shape: (N, K). dtype: output dtype.
        config: fixed launch config (meta-parameters + num_warps/num_stages); default: autotuned.
        out: contiguous [N, K] ``dtype`` tensor to write into (e.g. a dispatch workspace); default: new.
    Returns:
        [N, K] ``dtype`` (``out`` when given).
    Raises:
        ValueError: missing nested tensors for a uint8 absmax, too few bytes, wrong device, unfit ``out``.
    """
    n_out, k_in = int(shape[0]), int(shape[1])
    n = n_out * k_in
    double_quant = absmax.dtype == torch.uint8
    if double_quant and (nested_absmax is None or nested_code is None or nested_offset is None):
        raise ValueError("dequantize_4bit: a uint8 (double-quantized) absmax needs nested_absmax, nested_code "
                         "and nested_offset")
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if flat.numel() * 2 < n:
        raise ValueError(f"dequantize_4bit: packed holds {flat.numel()} bytes, shape {tuple(shape)} "
                         f"needs {(n + 1) // 2}")
    if blocksize % 2:
        raise ValueError(f"dequantize_4bit: blocksize={blocksize} must be even")
    check_device(flat, absmax, code, kernel=_dequant_4bit_kernel)
    out = output_buffer(out, (n_out, k_in), dtype, packed.device, "dequantize_4bit")
    if n == 0:
        return out
    code = code.float().contiguous()
    if double_quant:
        nested = (nested_absmax.float().contiguous(), nested_code.float().contiguous(),
                  nested_offset.float().reshape(1))
    else:
        nested = (code, code, code)  # unused placeholders (pointers must be valid tensors)
    args = (flat, absmax.contiguous(), code, *nested, out, n, (n + 1) // 2)
    kwargs = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, enable_fp_fusion=False)
    launch(_dequant_4bit_kernel, _autotuned, _grid(n), args, kwargs, config, lambda: {"BLOCK": 1 << 16})
    return out
