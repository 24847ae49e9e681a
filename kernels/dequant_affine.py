"""Float-offset group dequantization kernel (``qtune::dequantize_affine`` on CUDA).

Maths (the spec is :func:`qtune.formats.affine.dequantize_affine`), for ``W`` [N, K], ``b``-bit codes packed as a
little-endian bit stream per row (code ``k`` at stream bits ``[b·k, b·k + b)``) and ``G = ceil(K / g)`` groups::

    W[n, k] = fl(fl(s[n, k // g] · q[n, k]) + m[n, k // g])        s, m fp16 [N, G], arithmetic in fp32

with FMA contraction disabled, so the result is the reference's bit for bit. Each program dequantizes a
[BLOCK_N, BLOCK_K] tile (BLOCK_K a power of two ≥ 8; groups and tiles nest, both being powers of two): its bytes
are one contiguous block per row, split into codes in registers (:func:`affine_codes`).

Memory traffic per weight element: ``b/8`` B of codes + 4/g B of scale and offset + 2 B (fp16/bf16) or 4 B
(fp32) written: 2.56 B for 4-bit g64 → fp16.

Backward: none (frozen weight). :func:`affine_tile` is also the inner loop of the fused matmuls
(``matmul_affine.py``); ``qtune::linear_affine`` runs those or this kernel + cuBLAS (``routing.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_device, config, launch, output_buffer

CONFIGS = [
    config(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=1),
    config(BLOCK_N=32, BLOCK_K=256, num_warps=8, num_stages=1),
    config(BLOCK_N=8, BLOCK_K=1024, num_warps=8, num_stages=1),
]


@triton.jit
def affine_codes(w_ptr, offs_n, tile_k, N, W_BYTES, stride_wn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes ``q[offs_n, k0 : k0+BLOCK_K]`` as [len(offs_n), BLOCK_K], ``k0 = tile_k · BLOCK_K`` (the byte
    offsets are written as ``tile_k · constant`` so the compiler sees their alignment).

    The tile's bytes are read as one contiguous [BLOCK_N, BLOCK_K·BITS/8] block (128-bit loads) and split into
    codes in registers: a byte holds 8/BITS whole codes for 2/4/8 bits; for 3 bits every 3 bytes hold 8 codes
    (one 24-bit little-endian word).
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    MASK: tl.constexpr = (1 << BITS) - 1
    row = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    mask_n = (offs_n < N)[:, None]
    if BITS == 3:
        W8: tl.constexpr = BLOCK_K // 8
        b = (tile_k * W8 + tl.arange(0, W8)) * 3
        m = mask_n & (b[None, :] < W_BYTES)
        word = tl.load(row + b[None, :], mask=m, other=0).to(tl.int32)
        word = word | (tl.load(row + b[None, :] + 1, mask=m, other=0).to(tl.int32) << 8)
        word = word | (tl.load(row + b[None, :] + 2, mask=m, other=0).to(tl.int32) << 16)
        shifts = tl.arange(0, 8) * 3
        q = (word[:, :, None] >> shifts[None, None, :]) & MASK
        return tl.reshape(q, (BLOCK_N, BLOCK_K))
    else:
        PER: tl.constexpr = 8 // BITS
        NB: tl.constexpr = BLOCK_K // PER
        b = tile_k * NB + tl.arange(0, NB)
        byte = tl.load(row + b[None, :], mask=mask_n & (b[None, :] < W_BYTES), other=0).to(tl.int32)
        if PER == 1:
            return byte
        else:
            shifts = tl.arange(0, PER) * BITS
            q = (byte[:, :, None] >> shifts[None, None, :]) & MASK
            return tl.reshape(q, (BLOCK_N, BLOCK_K))


@triton.jit
def affine_tile(w_ptr, scale_ptr, offset_ptr, offs_n, tile_k, N, K, G, W_BYTES, stride_wn, stride_sn,
                BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``Ŵ[offs_n, k0 : k0+BLOCK_K]``, ``k0 = tile_k · BLOCK_K``, as [len(offs_n), BLOCK_K] (rows past N are 0;
    values past ``K`` are not meaningful, the caller masks them).

    The tile is split into ``NP`` equal parts along K that each lie in one group: the tile's groups when it spans
    several, else two halves of the one group it lies in. One scale and offset per row and part are loaded
    ([len(offs_n), NP]) and broadcast over the part's codes. (Never one scale per row broadcast over the whole
    tile: next to a matmul accumulator that form made ptxas spill at 128×128 tiles, ``python -m
    qtune.kernels.report``.)
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    NP: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K >= 2 * GROUP_SIZE else 2
    PART: tl.constexpr = BLOCK_K // NP
    k0 = tile_k * BLOCK_K
    q = affine_codes(w_ptr, offs_n, tile_k, N, W_BYTES, stride_wn, BITS, BLOCK_K).to(tl.float32)
    mask_n = offs_n < N
    g = (k0 + tl.arange(0, NP) * PART) // GROUP_SIZE
    gmask = mask_n[:, None] & (g[None, :] < G)
    rows = offs_n.to(tl.int64)[:, None] * stride_sn
    s = tl.load(scale_ptr + rows + g[None, :], mask=gmask, other=0).to(tl.float32)
    m = tl.load(offset_ptr + rows + g[None, :], mask=gmask, other=0).to(tl.float32)
    w = s[:, :, None] * tl.reshape(q, (BLOCK_N, NP, PART)) + m[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _dequant_affine_kernel(
    # pointers
    w_ptr,        # uint8 [N, W_BYTES] packed codes, inner stride 1
    scale_ptr,    # fp16 [N, G]
    offset_ptr,   # fp16 [N, G] (same strides as scale)
    out_ptr,      # [N, K] output dtype, inner stride 1
    # sizes
    N, K, G, W_BYTES,
    # strides (elements)
    stride_wn, stride_sn, stride_on,
    # meta-parameters
    BITS: tl.constexpr,          # 2, 3, 4 or 8
    GROUP_SIZE: tl.constexpr,    # input columns per scale/offset
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_k = tl.program_id(1)
    offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    w = affine_tile(w_ptr, scale_ptr, offset_ptr, offs_n, tile_k, N, K, G, W_BYTES, stride_wn, stride_sn,
                    BITS, GROUP_SIZE, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask)


_autotuned = triton.autotune(configs=CONFIGS, key=["N", "K", "BITS", "GROUP_SIZE"])(_dequant_affine_kernel)


def _grid(n: int, k: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))


def check_affine_args(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int,
                      in_features: int, what: str) -> tuple[int, int, int, int]:
    """Check the affine weight tensors against their metadata.

    Returns:
        ``(N, K, G, W_BYTES)``: rows, in_features, groups per row ``ceil(K/group_size)`` and packed bytes per row
        ``ceil(K/8)·bits``.
    Raises:
        ValueError: unsupported bits or group size, a non-uint8 or non-2-D weight, shapes that disagree.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{what}: bits={bits} is not one of 2, 3, 4, 8")
    if group_size not in (32, 64, 128):
        raise ValueError(f"{what}: group_size={group_size} is not one of 32, 64, 128")
    if weight.dim() != 2 or weight.dtype != torch.uint8:
        raise ValueError(f"{what}: weight must be uint8 [N, ceil(K/8)·bits], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape[0], int(in_features)
    g = -(-k // group_size)
    w_bytes = -(-k // 8) * bits
    if weight.shape[1] != w_bytes:
        raise ValueError(f"{what}: weight has {weight.shape[1]} bytes per row, {bits}-bit K={k} needs {w_bytes}")
    if tuple(scale.shape) != (n, g) or tuple(offset.shape) != (n, g):
        raise ValueError(f"{what}: scale {tuple(scale.shape)} and offset {tuple(offset.shape)} must be {(n, g)} "
                         f"(group_size={group_size}, K={k})")
    return n, k, g, w_bytes


def dequantize_affine(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int,
                      in_features: int, dtype: torch.dtype, *, config: Optional[dict] = None,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense affine weight; the CUDA kernel of ``qtune::dequantize_affine`` (same arguments).

    Args:
        weight: uint8 [N, ceil(K/8)·bits]. scale, offset: [N, ceil(K/group_size)] (fp16 in layers).
        bits: 2, 3, 4, 8. group_size: input columns per group. in_features: K. dtype: output dtype.
        config: fixed launch config; default: autotuned.
        out: contiguous [N, K] ``dtype`` tensor to write into; default: new.
    Returns:
        [N, K] ``dtype`` (``out`` when given).
    Raises:
        ValueError: shapes that disagree, unsupported bits, wrong device, unfit ``out``.
    """
    n, k, g, w_bytes = check_affine_args(weight, scale, offset, bits, group_size, in_features, "dequantize_affine")
    check_device(weight, scale, offset, kernel=_dequant_affine_kernel)
    out = output_buffer(out, (n, k), dtype, weight.device, "dequantize_affine")
    if out.numel() == 0:
        return out
    weight = weight.contiguous()
    scale = scale.contiguous()
    offset = offset.contiguous()
    args = (weight, scale, offset, out, n, k, g, w_bytes, weight.stride(0), scale.stride(0), out.stride(0))
    kwargs = dict(BITS=bits, GROUP_SIZE=group_size, enable_fp_fusion=False)
    launch(_dequant_affine_kernel, _autotuned, _grid(n, k), args, kwargs, config,
           lambda: {"BLOCK_N": 64, "BLOCK_K": 1024})
    return out
