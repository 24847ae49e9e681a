"""Fused GPTQ dequant-matmul: forward ``y = x·Ŵᵀ + b`` and backward ``dx = dy·Ŵ`` (CUDA kernels of
``qtune::linear_gptq`` and ``qtune::linear_gptq_grad_input``), 2/3/4/8-bit, any ``g_idx``.

Maths. ``Ŵ[n, k] = scales[g, n] · (q[k, n] − z[g, n])`` with ``g = g_idx[k]`` and ``z`` = stored
zero + 1 (see ``dequant_gptq.py``). The packed layout is [K, N]-major (codes packed along K,
contiguous along N), i.e. it already holds ``Ŵᵀ``. Each step loads the ``BLOCK_K·b/32`` int32 words
of a [BLOCK_K, BLOCK_N] tile once (128-bit loads along N) and shifts the codes out in registers (3-bit
codes that straddle two words combine two words of the same 32-row block). Without act-order (``g_idx
= k // g``, detected once per ``g_idx`` tensor) the tile's scales and zeros are one row, or
``BLOCK_K/g`` rows, loaded once and broadcast; with act-order they are gathered per row through
``g_idx`` (no reordering of the checkpoint). The tile is formed in fp32, cast to the activation dtype
and fed to ``tl.dot`` (fp16/bf16 tensor cores, fp32 accumulation; 3×TF32 for fp32 activations).
``Ŵ`` never exists in global memory.

Launch shapes as in ``matmul_4bit.py``: a tiled GEMM with grouped tile order for M > 16, and a split-K
GEMV (BLOCK_M = 16, fp32 ``atomic_add`` of partial sums) for decode, M ≤ 16.

Memory traffic per weight element (bytes), read once per M-tile: b/8 codes + (2 + b/8)/group_size scale
and zero (+ 4/N for ``g_idx`` with act-order), e.g. 0.520 at 4 bits and group 128 (0.268 at 2, 0.394
at 3, 1.023 at 8 bits). Dequantize-then-matmul moves that plus 4 bytes (write and re-read Ŵ in fp16).

Backward. ``y = x Ŵᵀ + b  ⇒  dx = dy Ŵ`` (frozen weight: no ``dŴ``; ``db`` is summed by the autograd
rule). ``_linear_gptq_bwd_kernel`` tiles ``dx`` [M, K], reduces over N and consumes the same [K, N]
tiles transposed in registers (``tl.trans``), so backward reads the packed weight exactly like forward
(same bytes per weight element); split over N for M ≤ 16.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (autotuners, check_device, config, config_set, deterministic_decode, dot_in_fp32,
                      dot_precision, fixed_config, launch, next_pow2, reduction_buffer, split_of, swizzle)
from .dequant_gptq import check_gptq_args, dequantize_gptq, gptq_tile, trivial_group_size

# Autotune config lists, picked per launch by ``config_set`` (see ``matmul_4bit.py``); BLOCK_K is a
# multiple of 32 (whole packed words).
CONFIGS = {
    "fwd": [
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=4),
    ],
    "fwd_fp32": [
        config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=2),
        config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=2),
    ],
    "fwd_decode": [
        config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SPLIT_K=8, num_warps=4, num_stages=3),
        config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, SPLIT_K=8, num_warps=4, num_stages=3),
        config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, SPLIT_K=2, num_warps=4, num_stages=4),
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
def _linear_gptq_fwd_kernel(
    # pointers
    x_ptr,          # [M, K] activations, inner stride 1
    qweight_ptr,    # int32 [ceil(K/32)·BITS, N]
    qzeros_ptr,     # int32 [G, ceil(N/32)·BITS]
    scales_ptr,     # float [G, N]
    g_idx_ptr,      # int32 [K]
    bias_ptr,       # [N] in x's dtype (HAS_BIAS only)
    y_ptr,          # [M, N]: x's dtype, or fp32 zeros when SPLIT_K > 1
    # sizes
    M, N, K, M_BUCKET,
    # strides (elements)
    stride_xm, stride_z, stride_ym,
    # meta-parameters
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,      # g_idx[k] == k // GROUP_SIZE, or 0: read g_idx (act-order)
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
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        wt = gptq_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, k0, offs_n, N, K, stride_z, BITS, BLOCK_K,
                       GROUP_SIZE)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), wt.to(dtype).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wt.to(dtype), acc, input_precision=DOT_PRECISION)
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
def _linear_gptq_bwd_kernel(
    # pointers
    dy_ptr,         # [M, N] output gradient, inner stride 1
    qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr,
    dx_ptr,         # [M, K]: dy's dtype, or fp32 zeros when SPLIT_N > 1
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_dym, stride_z, stride_dxm,
    # meta-parameters
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_N: tl.constexpr,
):
    pid_m, pid_k = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    dtype = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(pid_s * BLOCK_N, N, BLOCK_N * SPLIT_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        wt = gptq_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, k0, offs_n, N, K, stride_z, BITS, BLOCK_K,
                       GROUP_SIZE)
        if DOT_FP32:
            acc = tl.dot(dy.to(tl.float32), tl.trans(wt.to(dtype).to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, tl.trans(wt.to(dtype)), acc, input_precision=DOT_PRECISION)
    dx = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :]
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    if SPLIT_N == 1:
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(dx, acc, mask=mask, sem="relaxed")


_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"]
_TUNERS = autotuners(CONFIGS, _linear_gptq_fwd_kernel, _linear_gptq_bwd_kernel, _KEY, "y_ptr", "dx_ptr")


def _weight_tensors(qweight, qzeros, scales, g_idx, k):
    group_size = trivial_group_size(g_idx, scales.shape[0], k)
    tensors = (qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.to(torch.int32).contiguous())
    return tensors, group_size


def linear_gptq(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int, in_features: int, bias: Optional[torch.Tensor] = None, *,
                config: Optional[dict] = None) -> torch.Tensor:
    """Fused ``y = x Ŵᵀ + b``; the CUDA kernel of ``qtune::linear_gptq`` (same arguments).

    Args:
        x: (..., K) fp16/bf16/fp32. qweight/qzeros/scales/g_idx/bits/in_features: the GPTQ weight
            (see ``qtune.formats.gptq``). bias: [N] or None.
        config: fixed launch config (meta-parameters with SPLIT_K, num_warps, num_stages); default: autotuned.
    Returns:
        (..., N) in ``x.dtype``.
    Raises:
        ValueError: inconsistent weight tensors, wrong feature count, wrong device.
    """
    n, k = check_gptq_args(qweight, qzeros, scales, g_idx, bits, in_features, "linear_gptq")
    if x.shape[-1] != k:
        raise ValueError(f"linear_gptq: x has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype not in SUPPORTED_DTYPES:
        w = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, in_features, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    wt, group_size = _weight_tensors(qweight, qzeros, scales, g_idx, k)
    check_device(x, *wt, kernel=_linear_gptq_fwd_kernel)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros((*x.shape[:-1], n))
    cfg = fixed_config(config, "SPLIT_K", m, n, k)
    if cfg is not None and cfg["BLOCK_K"] % 32:
        raise ValueError(f"linear_gptq: BLOCK_K={cfg['BLOCK_K']} must be a multiple of 32 (whole packed words)")
    y = reduction_buffer(m, n, x2, split_of(cfg, "SPLIT_K", m, DECODE_MAX_M))
    b = bias.to(x.dtype).contiguous() if bias is not None else x2
    args = (x2, *wt, b, y, m, n, k, next_pow2(m), x2.stride(0), wt[1].stride(0), y.stride(0))
    kwargs = dict(BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
                  DOT_FP32=dot_in_fp32(x.dtype, _linear_gptq_fwd_kernel),
                  DOT_PRECISION=dot_precision(x.dtype))
    grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(n, mt["BLOCK_N"]), mt["SPLIT_K"])  # noqa: E731
    launch(_linear_gptq_fwd_kernel, _TUNERS[config_set("fwd", m, x.dtype, DECODE_MAX_M)], grid, args, kwargs, cfg)
    return y.to(x.dtype).view(*x.shape[:-1], n)


def linear_gptq_grad_input(grad_out: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                           scales: torch.Tensor, g_idx: torch.Tensor, bits: int, in_features: int, *,
                           config: Optional[dict] = None) -> torch.Tensor:
    """Fused ``dx = dy Ŵ``; the CUDA kernel of ``qtune::linear_gptq_grad_input`` (same arguments).

    Args:
        grad_out: (..., N) fp16/bf16/fp32. The weight arguments as in :func:`linear_gptq`.
        config: fixed launch config (with SPLIT_N); default: autotuned.
    Returns:
        (..., K) in ``grad_out.dtype``.
    """
    n, k = check_gptq_args(qweight, qzeros, scales, g_idx, bits, in_features, "linear_gptq_grad_input")
    if grad_out.shape[-1] != n:
        raise ValueError(f"linear_gptq_grad_input: grad_out has {grad_out.shape[-1]} features, the weight has {n} rows")
    if grad_out.dtype not in SUPPORTED_DTYPES:
        w = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, in_features, grad_out.dtype)
        return torch.matmul(grad_out, w)
    wt, group_size = _weight_tensors(qweight, qzeros, scales, g_idx, k)
    check_device(grad_out, *wt, kernel=_linear_gptq_bwd_kernel)
    dy = grad_out.reshape(-1, n)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    m = dy.shape[0]
    if m == 0 or k == 0:
        return grad_out.new_zeros((*grad_out.shape[:-1], k))
    cfg = fixed_config(config, "SPLIT_N", m, n, k)
    if cfg is not None and cfg["BLOCK_K"] % 32:
        raise ValueError(f"linear_gptq: BLOCK_K={cfg['BLOCK_K']} must be a multiple of 32 (whole packed words)")
    dx = reduction_buffer(m, k, dy, split_of(cfg, "SPLIT_N", m, DECODE_MAX_M))
    args = (dy, *wt, dx, m, n, k, next_pow2(m), dy.stride(0), wt[1].stride(0), dx.stride(0))
    kwargs = dict(BITS=bits, GROUP_SIZE=group_size, DOT_FP32=dot_in_fp32(dy.dtype, _linear_gptq_bwd_kernel),
                  DOT_PRECISION=dot_precision(dy.dtype))
    grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(k, mt["BLOCK_K"]), mt["SPLIT_N"])  # noqa: E731
    launch(_linear_gptq_bwd_kernel, _TUNERS[config_set("bwd", m, dy.dtype, DECODE_MAX_M)], grid, args, kwargs, cfg)
    return dx.to(dy.dtype).view(*grad_out.shape[:-1], k)
