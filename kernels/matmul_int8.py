"""Fused 8-bit weight-only dequant-matmul: forward ``y = x·Ŵᵀ + b`` and backward ``dx = dy·Ŵ`` (CUDA
kernels of ``qtune::linear_int8``, ``qtune::linear_int8_grad_input`` and, with the LLM.int8 weight
viewed as per-row absmax, ``qtune::linear_llm_int8_grad_input``).

Maths. ``Ŵ[n, k] = q[n, k] · a[n, g] / 127`` (symmetric, int8) or ``(q[n, k] − z[n, g]) · s[n, g]``
(zero-point, uint8), ``g = k // group_size`` (see ``dequant_int8.py``). Each step loads a [BLOCK_N,
BLOCK_K] tile of codes (128-bit loads along K) and scales it in fp32: one scale (and zero) per row
and tile when a group spans whole tiles (per-row scaling included), ``BLOCK_K/group_size`` per row
broadcast when tiles span whole groups, a gather otherwise. The tile is cast to the activation dtype
and fed to ``tl.dot`` (fp32 accumulation; 3×TF32 for fp32 activations). ``Ŵ`` never exists in global
memory. Tiled GEMM for M > 16, split-K GEMV with fp32 ``atomic_add`` for M ≤ 16, as in
``matmul_4bit.py``.

Memory traffic per weight element (bytes), read once per M-tile: 1 code + 4/group_size scale
(+ 1/group_size zero), i.e. 1.0 per row-scaled weight, 1.04 at group 128.

Backward. ``y = x Ŵᵀ + b  ⇒  dx = dy Ŵ`` (frozen weight). LLM.int8's backward is this kernel too:
bitsandbytes' ``MatMul8bitLt`` also computes ``dx`` from the dequantized int8 weight (``CB·SCB/127``),
not from an int8 product.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (autotuners, check_device, config, config_set, deterministic_decode, dot_in_fp32,
                      dot_precision, fixed_config, launch, next_pow2, reduction_buffer, split_of, swizzle)
from .dequant_int8 import dequantize_int8, int8_tile

# Autotune config lists, picked per launch by ``config_set`` (see ``matmul_4bit.py``).
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
def _linear_int8_fwd_kernel(
    # pointers
    x_ptr,          # [M, K] activations, inner stride 1
    w_ptr,          # int8/uint8 [N, K] codes, inner stride 1
    scale_ptr,      # fp32 [N, G]
    zero_ptr,       # uint8 [N, G] (HAS_ZERO only)
    bias_ptr,       # [N] in x's dtype (HAS_BIAS only)
    y_ptr,          # [M, N]: x's dtype, or fp32 zeros when SPLIT_K > 1
    # sizes
    M, N, K, G, M_BUCKET,
    # strides
    stride_xm, stride_wn, stride_ym,
    # meta-parameters
    HAS_ZERO: tl.constexpr,
    GROUP_SIZE: tl.constexpr,      # input columns per scale; 0 = one scale per row
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
        w = int8_tile(w_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, G, stride_wn, HAS_ZERO, GROUP_SIZE, BLOCK_K)
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
def _linear_int8_bwd_kernel(
    # pointers
    dy_ptr,         # [M, N] output gradient, inner stride 1
    w_ptr, scale_ptr, zero_ptr,
    dx_ptr,         # [M, K]: dy's dtype, or fp32 zeros when SPLIT_N > 1
    # sizes
    M, N, K, G, M_BUCKET,
    # strides
    stride_dym, stride_wn, stride_dxm,
    # meta-parameters
    HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        w = int8_tile(w_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, G, stride_wn, HAS_ZERO, GROUP_SIZE, BLOCK_K)
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


_KEY = ["M_BUCKET", "N", "K", "G", "GROUP_SIZE"]
_TUNERS = autotuners(CONFIGS, _linear_int8_fwd_kernel, _linear_int8_bwd_kernel, _KEY, "y_ptr", "dx_ptr")


def _weight_args(weight, scale, zero, group_size, what):
    if weight.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    g = 1 if group_size == -1 else -(-k // group_size)
    if scale.numel() != n * g:
        raise ValueError(f"{what}: scale has {scale.numel()} elements, group_size={group_size} with weight "
                         f"{tuple(weight.shape)} needs [{n}, {g}]")
    if zero is not None and zero.numel() != n * g:
        raise ValueError(f"{what}: zero has {zero.numel()} elements, expected [{n}, {g}]")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    scale = scale.reshape(n, g).float().contiguous()
    zero_t = zero.reshape(n, g).contiguous() if zero is not None else scale
    meta = dict(HAS_ZERO=zero is not None, GROUP_SIZE=0 if g == 1 else group_size)
    return n, k, g, (weight, scale, zero_t), meta


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                group_size: int, bias: Optional[torch.Tensor] = None, *,
                config: Optional[dict] = None) -> torch.Tensor:
    """Fused ``y = x Ŵᵀ + b``; the CUDA kernel of ``qtune::linear_int8`` (same arguments).

    Args:
        x: (..., K) fp16/bf16/fp32. weight: int8/uint8 [N, K]. scale: fp32 [N, G]. zero: uint8 [N, G]
            or None. group_size: -1 or the group width. bias: [N] or None.
        config: fixed launch config (with SPLIT_K); default: autotuned.
    Returns:
        (..., N) in ``x.dtype``.
    """
    n, k, g, wt, meta = _weight_args(weight, scale, zero, group_size, "linear_int8")
    if x.shape[-1] != k:
        raise ValueError(f"linear_int8: x has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype not in SUPPORTED_DTYPES:
        w = dequantize_int8(weight, scale, zero, group_size, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    check_device(x, *wt, kernel=_linear_int8_fwd_kernel)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros((*x.shape[:-1], n))
    cfg = fixed_config(config, "SPLIT_K", m, n, k)
    y = reduction_buffer(m, n, x2, split_of(cfg, "SPLIT_K", m, DECODE_MAX_M))
    b = bias.to(x.dtype).contiguous() if bias is not None else x2
    args = (x2, *wt, b, y, m, n, k, g, next_pow2(m), x2.stride(0), wt[0].stride(0), y.stride(0))
    kwargs = dict(meta, HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.dtype, _linear_int8_fwd_kernel),
                  DOT_PRECISION=dot_precision(x.dtype))
    grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(n, mt["BLOCK_N"]), mt["SPLIT_K"])  # noqa: E731
    launch(_linear_int8_fwd_kernel, _TUNERS[config_set("fwd", m, x.dtype, DECODE_MAX_M)], grid, args, kwargs, cfg)
    return y.to(x.dtype).view(*x.shape[:-1], n)


def linear_int8_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           zero: Optional[torch.Tensor], group_size: int, *,
                           config: Optional[dict] = None) -> torch.Tensor:
    """Fused ``dx = dy Ŵ``; the CUDA kernel of ``qtune::linear_int8_grad_input`` (same arguments).

    Returns:
        (..., K) in ``grad_out.dtype``.
    """
    n, k, g, wt, meta = _weight_args(weight, scale, zero, group_size, "linear_int8_grad_input")
    if grad_out.shape[-1] != n:
        raise ValueError(f"linear_int8_grad_input: grad_out has {grad_out.shape[-1]} features, the weight has {n} rows")
    if grad_out.dtype not in SUPPORTED_DTYPES:
        return torch.matmul(grad_out, dequantize_int8(weight, scale, zero, group_size, grad_out.dtype))
    check_device(grad_out, *wt, kernel=_linear_int8_bwd_kernel)
    dy = grad_out.reshape(-1, n)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    m = dy.shape[0]
    if m == 0 or k == 0:
        return grad_out.new_zeros((*grad_out.shape[:-1], k))
    cfg = fixed_config(config, "SPLIT_N", m, n, k)
    dx = reduction_buffer(m, k, dy, split_of(cfg, "SPLIT_N", m, DECODE_MAX_M))
    args = (dy, *wt, dx, m, n, k, g, next_pow2(m), dy.stride(0), wt[0].stride(0), dx.stride(0))
    kwargs = dict(meta, DOT_FP32=dot_in_fp32(dy.dtype, _linear_int8_bwd_kernel), DOT_PRECISION=dot_precision(dy.dtype))
    grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(k, mt["BLOCK_K"]), mt["SPLIT_N"])  # noqa: E731
    launch(_linear_int8_bwd_kernel, _TUNERS[config_set("bwd", m, dy.dtype, DECODE_MAX_M)], grid, args, kwargs, cfg)
    return dx.to(dy.dtype).view(*grad_out.shape[:-1], k)


def linear_llm_int8_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, threshold: float, *,
                               config: Optional[dict] = None) -> torch.Tensor:
    """``dx = dy Ŵ`` with ``Ŵ = CB · SCB / 127``; the CUDA kernel of ``qtune::linear_llm_int8_grad_input``.

    The outlier threshold only shapes the forward decomposition; the gradient uses the full int8 weight
    (as the reference and bitsandbytes do).
    """
    return linear_int8_grad_input(grad_out, weight, scb.reshape(-1, 1), None, -1, config=config)
