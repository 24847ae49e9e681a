"""Fused affine dequant-matmul: forward ``y = x·Ŵᵀ + b`` and backward ``dx = dy·Ŵ`` (CUDA kernels of
``qtune::linear_affine`` and ``qtune::linear_affine_grad_input``), 2/3/4/8-bit codes, groups of 32/64/128.

Maths (the spec is :func:`qtune.formats.affine.dequantize_affine`). For the weight [N, K] with ``b``-bit codes
``q`` packed as a little-endian bit stream per row (code ``k`` at stream bits ``[b·k, b·k + b)``; 3-bit codes
straddle bytes, every 3 bytes hold 8 codes) and fp16 scale ``s`` and offset ``m`` [N, G], ``G = ceil(K/g)``::

    Ŵ[n, k] = fl(fl(s[n, k // g] · q[n, k]) + m[n, k // g])        (fp32 arithmetic)

The codes are [N, K]-major (row ``n`` holds the weights of output ``n``), so each step forms the fp32 tile
``Ŵ[offs_n, k0 : k0+BLOCK_K]`` with :func:`~.dequant_affine.affine_tile` (the function the dequantize kernel
uses: the tile's bytes are one contiguous block per row, split into codes in registers; one scale and offset
per row and group, or per row and half tile when the tile lies inside one group, broadcast), casts it to the
activation dtype and feeds it to ``tl.dot`` (fp16/bf16 tensor cores, fp32 accumulation; 3×TF32 for fp32
activations): forward multiplies by its transpose, backward by the tile itself. The kernels are compiled without FMA contraction, so the tile is the reference's fp32 ``Ŵ`` bit for bit
(``s·q + m`` is not fused into one rounding). ``Ŵ`` never exists in global memory.

K need not be a multiple of the tile, of 8 or of the group: bytes past the row (``W_BYTES``) and groups past
``G`` load as 0, activations (forward) past K load as 0, and ``dx`` (backward) is stored only below K, so the
values the tile holds past K (the offset ``m`` of the partial group) never reach an output.

Launch shapes as in ``matmul_gguf.py``: a tiled GEMM with grouped tile order for M > 16 (smaller tiles when
the packed rows are not 16-byte aligned, ``_odd_k``), and a split-K (forward) / split-N (backward) GEMV with
BLOCK_M = 16 and fp32 ``atomic_add`` of partial sums for decode, M ≤ 16 (no split in deterministic mode).
``BLOCK_K`` is a power of two ≥ 32; tiles and groups nest (a tile inside one group, or whole groups in a tile).

Memory traffic per weight element (bytes), read once per M-tile: ``b/8 + 4/g`` (0.5625 at 4 bits g64,
0.4375 at 3 bits g64, 0.3125 at 2 bits g64, 1.0625 at 8 bits g64). Dequantize-then-matmul moves that plus
4 bytes (write and re-read Ŵ in fp16).

Backward. ``y = x Ŵᵀ + b  ⇒  dx = dy Ŵ`` (frozen weight: no ``dŴ``; ``db`` is summed by the autograd rule;
the op saves the packed codes, scales and offsets, and this kernel re-dequantizes them tile by tile).
``_linear_affine_bwd_kernel`` tiles ``dx`` [M, K] and reduces over N, reading the codes like forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (autotuners, check_device, config, config_set, deterministic_decode, dot_in_fp32,
                      dot_precision, fixed_config, launch, next_pow2, reduction_buffer, split_of, swizzle)
from .dequant_affine import affine_tile, check_affine_args, dequantize_affine

# Autotune config lists, picked per launch by ``config_set`` (see ``matmul_4bit.py``); BLOCK_K is a power
# of two ≥ 32. "_odd_k": packed rows that are not a multiple of 16 bytes (K not a multiple of 128/bits): the
# code bytes cannot move in 16-byte transactions and the pipeliner holds them in registers, so smaller tiles
# (the 16-byte-aligned tile lists spill there). Every list compiles without spills for sm_80 and sm_90
# (``python -m qtune.kernels.report --all``).
CONFIGS = {
    "fwd": [
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=4),
    ],
    "fwd_odd_k": [
        config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=3),
    ],
    "fwd_fp32": [
        config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=2),
        config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=2),
    ],
    "fwd_decode": [
        config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SPLIT_K=8, num_warps=4, num_stages=3),
        config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, SPLIT_K=8, num_warps=4, num_stages=3),
        config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, SPLIT_K=4, num_warps=8, num_stages=3),
    ],
    "bwd": [
        config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_N=1, num_warps=8, num_stages=3),
        config(BLOCK_M=128, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, SPLIT_N=1, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SPLIT_N=1, num_warps=8, num_stages=3),
    ],
    "bwd_fp32": [
        config(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, SPLIT_N=1, num_warps=8, num_stages=2),
        config(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, SPLIT_N=1, num_warps=8, num_stages=2),
        config(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, SPLIT_N=1, num_warps=4, num_stages=2),
    ],
    "bwd_odd_k": [
        config(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, SPLIT_N=1, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, SPLIT_N=1, num_warps=4, num_stages=3),
    ],
    "bwd_decode": [
        config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SPLIT_N=8, num_warps=4, num_stages=3),
        config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, SPLIT_N=8, num_warps=4, num_stages=3),
        config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, SPLIT_N=4, num_warps=4, num_stages=3),
    ],
}
# torch.use_deterministic_algorithms(True): decode shapes without split (no atomics)
CONFIGS["fwd_decode_det"] = deterministic_decode("SPLIT_K")
CONFIGS["bwd_decode_det"] = deterministic_decode("SPLIT_N")
DECODE_MAX_M = 16
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _linear_affine_fwd_kernel(
    # pointers
    x_ptr,          # [M, K] activations, inner stride 1
    w_ptr,          # uint8 [N, W_BYTES] packed codes, inner stride 1
    scale_ptr,      # fp16 [N, G]
    offset_ptr,     # fp16 [N, G] (same strides as scale)
    bias_ptr,       # [N] in x's dtype (HAS_BIAS only)
    y_ptr,          # [M, N]: x's dtype, or fp32 zeros when SPLIT_K > 1
    # sizes
    M, N, K, G, W_BYTES, M_BUCKET,
    # strides (elements)
    stride_xm, stride_wn, stride_sn, stride_ym,
    # meta-parameters
    BITS: tl.constexpr,            # 2, 3, 4 or 8
    GROUP_SIZE: tl.constexpr,      # input columns per scale/offset: 32, 64 or 128
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # loop over K-tile indices (not offsets): the byte offsets of a tile are tile_k · constant
    for tile_k in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = affine_tile(w_ptr, scale_ptr, offset_ptr, offs_n, tile_k, N, K, G, W_BYTES, stride_wn, stride_sn,
                        BITS, GROUP_SIZE, BLOCK_K)                      # [BLOCK_N, BLOCK_K] fp32
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(dtype).to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(dtype)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y, acc, mask=mask, sem="relaxed")


@triton.jit
def _linear_affine_bwd_kernel(
    # pointers
    dy_ptr,         # [M, N] output gradient, inner stride 1
    w_ptr, scale_ptr, offset_ptr,
    dx_ptr,         # [M, K]: dy's dtype, or fp32 zeros when SPLIT_N > 1
    # sizes
    M, N, K, G, W_BYTES, M_BUCKET,
    # strides
    stride_dym, stride_wn, stride_sn, stride_dxm,
    # meta-parameters
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_N: tl.constexpr,
):
    pid_m, tile_k = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dtype = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(pid_s * BLOCK_N, N, BLOCK_N * SPLIT_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = affine_tile(w_ptr, scale_ptr, offset_ptr, offs_n, tile_k, N, K, G, W_BYTES, stride_wn, stride_sn,
                        BITS, GROUP_SIZE, BLOCK_K)                      # [BLOCK_N, BLOCK_K] fp32, 0 past N
        if DOT_FP32:
            acc = tl.dot(dy.to(tl.float32), w.to(dtype).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w.to(dtype), acc, input_precision=DOT_PRECISION)
    dx = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :]
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    if SPLIT_N == 1:
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(dx, acc, mask=mask, sem="relaxed")


_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"]
_TUNERS = autotuners(CONFIGS, _linear_affine_fwd_kernel, _linear_affine_bwd_kernel, _KEY, "y_ptr", "dx_ptr")


def odd_rows(w_bytes: int) -> bool:
    """Packed rows of ``w_bytes`` bytes that are not 16-byte aligned: the ``_odd_k`` config lists."""
    return w_bytes % 16 != 0


def _fixed(config: Optional[dict], split_name: str, m: int, n: int, k: int, what: str) -> Optional[dict]:
    cfg = fixed_config(config, split_name, m, n, k)
    if cfg is not None and (cfg["BLOCK_K"] < 32 or cfg["BLOCK_K"] & (cfg["BLOCK_K"] - 1)):
        raise ValueError(f"{what}: BLOCK_K={cfg['BLOCK_K']} must be a power of two ≥ 32 (tiles and groups nest)")
    return cfg


def _weight_tensors(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple:
    # affine_tile addresses scale and offset with one row stride: both contiguous [N, G]
    return weight.contiguous(), scale.contiguous(), offset.contiguous()


def linear_affine(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                  group_size: int, in_features: int, bias: Optional[torch.Tensor] = None, *,
                  config: Optional[dict] = None) -> torch.Tensor:
    """Fused ``y = x Ŵᵀ + b``; the CUDA kernel of ``qtune::linear_affine`` (same arguments).

    Args:
        x: (..., K) fp16/bf16/fp32. weight: uint8 codes [N, ceil(K/8)·bits]. scale, offset: fp16 [N, ceil(K/g)].
        bits: 2, 3, 4 or 8. group_size: g, 32/64/128. in_features: K. bias: [N] or None.
        config: fixed launch config (meta-parameters with SPLIT_K, num_warps, num_stages); default: autotuned.
    Returns:
        (..., N) in ``x.dtype``.
    Raises:
        ValueError: weight tensors that disagree with their metadata, wrong feature count, wrong device, a
            ``config`` whose BLOCK_K is not a power of two ≥ 32.
    """
    n, k, g, w_bytes = check_affine_args(weight, scale, offset, bits, group_size, in_features, "linear_affine")
    if x.shape[-1] != k:
        raise ValueError(f"linear_affine: x has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype not in SUPPORTED_DTYPES:
        w = dequantize_affine(weight, scale, offset, bits, group_size, in_features, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    wt = _weight_tensors(weight, scale, offset)
    check_device(x, *wt, kernel=_linear_affine_fwd_kernel)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros((*x.shape[:-1], n))
    cfg = _fixed(config, "SPLIT_K", m, n, k, "linear_affine")
    y = reduction_buffer(m, n, x2, split_of(cfg, "SPLIT_K", m, DECODE_MAX_M))
    b = bias.to(x.dtype).contiguous() if bias is not None else x2
    args = (x2, *wt, b, y, m, n, k, g, w_bytes, next_pow2(m), x2.stride(0), wt[0].stride(0), wt[1].stride(0),
            y.stride(0))
    kwargs = dict(BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
                  DOT_FP32=dot_in_fp32(x.dtype, _linear_affine_fwd_kernel), DOT_PRECISION=dot_precision(x.dtype),
                  enable_fp_fusion=False)
    grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(n, mt["BLOCK_N"]), mt["SPLIT_K"])  # noqa: E731
    tuner = _TUNERS[config_set("fwd", m, x.dtype, DECODE_MAX_M, odd_k=odd_rows(w_bytes))]
    launch(_linear_affine_fwd_kernel, tuner, grid, args, kwargs, cfg)
    return y.to(x.dtype).view(*x.shape[:-1], n)


def linear_affine_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                             offset: torch.Tensor, bits: int, group_size: int, in_features: int, *,
                             config: Optional[dict] = None) -> torch.Tensor:
    """Fused ``dx = dy Ŵ``; the CUDA kernel of ``qtune::linear_affine_grad_input`` (same arguments).

    Args:
        grad_out: (..., N) fp16/bf16/fp32. The weight arguments as in :func:`linear_affine`.
        config: fixed launch config (with SPLIT_N); default: autotuned.
    Returns:
        (..., K) in ``grad_out.dtype``.
    Raises:
        ValueError: as :func:`linear_affine` (``grad_out`` must have N features).
    """
    n, k, g, w_bytes = check_affine_args(weight, scale, offset, bits, group_size, in_features,
                                         "linear_affine_grad_input")
    if grad_out.shape[-1] != n:
        raise ValueError(f"linear_affine_grad_input: grad_out has {grad_out.shape[-1]} features, the weight has "
                         f"{n} rows")
    if grad_out.dtype not in SUPPORTED_DTYPES:
        return torch.matmul(grad_out, dequantize_affine(weight, scale, offset, bits, group_size, in_features,
                                                        grad_out.dtype))
    wt = _weight_tensors(weight, scale, offset)
    check_device(grad_out, *wt, kernel=_linear_affine_bwd_kernel)
    dy = grad_out.reshape(-1, n)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    m = dy.shape[0]
    if m == 0 or k == 0:
        return grad_out.new_zeros((*grad_out.shape[:-1], k))
    cfg = _fixed(config, "SPLIT_N", m, n, k, "linear_affine_grad_input")
    dx = reduction_buffer(m, k, dy, split_of(cfg, "SPLIT_N", m, DECODE_MAX_M))
    args = (dy, *wt, dx, m, n, k, g, w_bytes, next_pow2(m), dy.stride(0), wt[0].stride(0), wt[1].stride(0),
            dx.stride(0))
    kwargs = dict(BITS=bits, GROUP_SIZE=group_size, DOT_FP32=dot_in_fp32(dy.dtype, _linear_affine_bwd_kernel),
                  DOT_PRECISION=dot_precision(dy.dtype), enable_fp_fusion=False)
    grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(k, mt["BLOCK_K"]), mt["SPLIT_N"])  # noqa: E731
    tuner = _TUNERS[config_set("bwd", m, dy.dtype, DECODE_MAX_M, odd_k=odd_rows(w_bytes))]
    launch(_linear_affine_bwd_kernel, tuner, grid, args, kwargs, cfg)
    return dx.to(dy.dtype).view(*grad_out.shape[:-1], k)
