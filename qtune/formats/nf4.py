"""NF4 and FP4: 4-bit blockwise-absmax quantization (QLoRA), bitsandbytes-compatible.

Maths. The weight ``W`` ([N, K], row-major) is flattened and cut into blocks of ``blocksize``
consecutive elements (the last block may be partial). For block ``b`` with absmax ``a_b``::

    code(w) = argmin_j | clamp(w · (1/a_b), −1, 1) − T[j] |        (T: the 16-entry NF4 or FP4 table)
    ŵ       = T[code(w)] · a_b

Ties go to the lower table entry in sorted order (bitsandbytes' midpoint ``bucketize``). Two codes
share a byte, the first in the high nibble: ``byte_i = code[2i] << 4 | code[2i+1]``.

Double quantization (QLoRA §3) stores the fp32 absmax itself in 8 bits: with ``c = mean(a)``,
``a − c`` is quantized blockwise (blocks of 256) with bitsandbytes' signed dynamic 8-bit map ``D``
and an fp32 absmax ``s`` per 256 blocks, so ``a_b ≈ D[q_b] · s_{b//256} + c``. That costs
8 + 32/256 bits per block instead of 32. The blockwise-absmax core and that 8-bit code live in
:mod:`qtune.formats.blockwise`.

Layout (identical bytes to ``bitsandbytes.functional.quantize_4bit``): ``packed`` uint8, ``absmax``
fp32 [n_blocks] (uint8 with double quant), ``nested_absmax`` fp32 [ceil(n_blocks/256)],
``nested_offset`` fp32 scalar. In memory ``packed`` is kept 2-D by output row, [N, K/2], whenever
``K % blocksize == 0`` (blocks then never straddle rows); otherwise it is bitsandbytes' [ceil(N·K/2), 1].
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping

import torch

from .base import CliOption, QuantConfig, check_weight
from .blockwise import NESTED_BLOCKSIZE, absmax_scaled_blocks, nearest_code
from .blockwise import dequantize_blockwise_8bit, dynamic_map, quantize_blockwise_8bit  # noqa: F401  (also nf4.*)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# The NF4 table of QLoRA (quantiles of N(0,1), normalized to [-1, 1]), as fp32 values.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bits) in bitsandbytes' code order, before normalization by 12.
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        t = torch.tensor(_FP4, dtype=torch.float32)
        return t / t.abs().max()
    raise ValueError(f"quant_type={quant_type!r} is not one of 'nf4', 'fp4'")


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 code table (``quant_map``) for ``"nf4"`` or ``"fp4"``: a new tensor on each call
    (layers keep it as a buffer; a shared one would alias across layers, which safetensors refuses)."""
    return _code_cpu(quant_type).to(device, copy=True)


@dataclasses.dataclass(frozen=True)
class _FourBitConfig(QuantConfig):
    """Common fields of NF4 and FP4.

    Attributes:
        blocksize: elements per absmax block, one of 32…4096 (powers of two). Default 64.
        double_quant: store the absmax in 8 bits (QLoRA's double quantization).
    """

    bits: ClassVar[int] = 4
    op_family: ClassVar[str] = "4bit"
    cli_options: ClassVar[tuple[CliOption, ...]] = (
        CliOption("double_quant", "NF4/FP4: 8-bit absmax (QLoRA double quantization)", type=bool),
        CliOption("blocksize", "NF4/FP4 block size (default 64)"),
    )
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"{type(self).__name__}.blocksize={self.blocksize} is not supported; choose one of {BLOCKSIZES}")

    @property
    def quant_type(self) -> str:
        return self.format


@dataclasses.dataclass(frozen=True)
class NF4Config(_FourBitConfig):
    """4-bit NormalFloat with blockwise absmax (QLoRA)."""

    format: ClassVar[str] = "nf4"
    spec_aliases: ClassVar[Mapping[str, Mapping[str, Any]]] = {"nf4_dq": {"double_quant": True}}


@dataclasses.dataclass(frozen=True)
class FP4Config(_FourBitConfig):
    """4-bit float (e2m1) with blockwise absmax."""

    format: ClassVar[str] = "fp4"
    spec_aliases: ClassVar[Mapping[str, Mapping[str, Any]]] = {"fp4_dq": {"double_quant": True}}


@dataclasses.dataclass
class FourBitTensors:
    """The tensors of one 4-bit weight. See the module docstring for the layout."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    blocksize: int
    quant_type: str
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def packed_layout(shape: tuple[int, int], blocksize: int) -> tuple[int, int]:
    """In-memory shape of ``packed``: [N, K/2] when blocks align with rows, else [ceil(N·K/2), 1]."""
    n, k = shape
    if k % blocksize == 0:
        return (n, k // 2)
    return ((n * k + 1) // 2, 1)


def n_blocks(shape: tuple[int, int], blocksize: int) -> int:
    return math.ceil(shape[0] * shape[1] / blocksize)


def quantize_blocks_4bit(flat: torch.Tensor, blocksize: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference blockwise 4-bit quantization of a flat fp32 tensor (the spec of the native CPU kernel).

    Args:
        flat: fp32 [n]. blocksize: elements per block. code: fp32 [16] table.
    Returns:
        (uint8 [ceil(n/2)] packed codes, high nibble first; fp32 [ceil(n/blocksize)] absmax).
    """
    absmax, scaled = absmax_scaled_blocks(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the pad nibble encodes 0.0, as in bitsandbytes
    q = nearest_code(scaled, code).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def quantize_4bit(weight: torch.Tensor, config: _FourBitConfig, *, name: str = "weight",
                  blocks_fn=quantize_blocks_4bit) -> FourBitTensors:
    """Quantize a float weight to NF4/FP4 (bitsandbytes-identical bytes).

    Args:
        weight: [N, K] fp16/bf16/fp32/fp64.
        config: :class:`NF4Config` or :class:`FP4Config`.
        name: the layer's name, used in error messages.
        blocks_fn: the blockwise kernel, :func:`quantize_blocks_4bit` or an op with the same contract
            (``torch.ops.qtune.quantize_blocks_4bit`` dispatches to the native CPU kernel).
    Returns:
        :class:`FourBitTensors` on ``weight``'s device.
    Raises:
        TypeError/ValueError: non-float, non-2-D, or non-finite weight.
    """
    check_weight(weight, name=name)
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    flat = weight.detach().reshape(-1).float()
    code = code_table(config.quant_type, weight.device)
    packed, absmax = blocks_fn(flat, config.blocksize, code)
    t = FourBitTensors(packed=packed.view(packed_layout(shape, config.blocksize)), absmax=absmax, code=code,
                       shape=shape, blocksize=config.blocksize, quant_type=config.quant_type)
    if config.double_quant:
        offset = absmax.mean()
        t.absmax, t.nested_absmax = quantize_blockwise_8bit(absmax - offset)
        t.nested_code = dynamic_map(weight.device)
        t.nested_offset = offset.reshape(())
    return t


def dequantize_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                      nested_offset: torch.Tensor | None) -> torch.Tensor:
    """fp32 per-block absmax, undoing double quantization when ``absmax`` is uint8."""
    if absmax.dtype != torch.uint8:
        return absmax.float()
    if nested_absmax is None or nested_code is None or nested_offset is None:
        raise ValueError("uint8 (double-quantized) absmax needs nested_absmax, nested_code and nested_offset")
    return dequantize_blockwise_8bit(absmax, nested_absmax, nested_code) + nested_offset


@functools.cache
def _nibble_index(device: torch.device) -> torch.Tensor:
    # a little-endian 16-bit word -> its 4 nibbles in weight order: (b0 >> 4, b0 & 15, b1 >> 4, b1 & 15)
    w = torch.arange(65536, device=device)
    b0, b1 = w & 0xFF, w >> 8
    return torch.stack([b0 >> 4, b0 & 0xF, b1 >> 4, b1 & 0xF], dim=-1)


def decode_nibbles(packed: torch.Tensor, code: torch.Tensor, n: int) -> torch.Tensor:
    """``code[nibble]`` for the first ``n`` nibbles of ``packed`` (high nibble first), fp32 [n].

    One gather from a 65536×4 table decodes four weights per 16-bit word; on CPU this is ~2× faster
    than decoding byte by byte.
    """
    flat = packed.reshape(-1)
    if flat.numel() % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    lut = code.float()[_nibble_index(code.device)]                 # [65536, 4]
    words = flat.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.index_select(lut, 0, words).view(-1)[:n]


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    shape: tuple[int, int] | list[int], dtype: torch.dtype = torch.float32, *,
                    nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                    nested_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Reference NF4/FP4 dequantization: ``W[e] = code[nibble(e)] · absmax[e // blocksize]``.

    Args:
        packed: uint8, ceil(N·K/2) bytes in any 2-D view (high nibble first).
        absmax: fp32 [n_blocks], or uint8 [n_blocks] with the ``nested_*`` tensors (double quant).
        code: fp32 [16] table.
        blocksize: elements per block.
        shape: (N, K).
        dtype: output dtype; the product is formed in fp32 and then cast (as bitsandbytes does).
    Returns:
        Tensor [N, K] of ``dtype``.
    """
    n_out, k_in = int(shape[0]), int(shape[1])
    n = n_out * k_in
    scale = dequantize_absmax(absmax, nested_absmax, nested_code, nested_offset)
    vals = decode_nibbles(packed, code, n)
    full = n - n % blocksize
    if full == n:
        out = (vals.view(-1, blocksize) * scale.view(-1, 1)).view(n)
    else:
        out = torch.empty_like(vals)
        out[:full] = (vals[:full].view(-1, blocksize) * scale[:-1].view(-1, 1)).view(full)
        out[full:] = vals[full:] * scale[-1]
    return out.view(n_out, k_in).to(dtype)
