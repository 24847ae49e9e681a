"""LLM.int8() forward on CUDA (``qtune::linear_llm_int8``): int8×int8→int32 GEMM with the row/column
scaling fused into its epilogue, plus the 16-bit outlier columns.

Maths (the spec is :func:`qtune.formats.int8.llm_int8_linear`, bitsandbytes' ``MatMul8bitLt``). With
outlier columns ``O = {k : max_m |x[m,k]| ≥ threshold}`` (none when threshold = 0)::

    x̄[m, k]  = 0 if |x[m, k]| ≥ threshold else x[m, k]              (outlier elements removed)
    s_x[m]   = max_k |x̄[m, k]|
    x_q[m, k] = 0 if k ∈ O else round(x̄[m, k] · 127 / s_x[m])          (int8, ties to even)
    y        = (x_q W_qᵀ) · s_x s_wᵀ / 127² + b  +  x_O Ŵ_Oᵀ,   Ŵ_O = W_q[:, O] · s_w / 127

0. The outlier columns ``O`` are a column reduction of ``|x| ≥ threshold`` in PyTorch (their indices
   are needed on the host for step 3 anyway, as in the reference).
1. ``_quantize_rows_kernel`` fuses the outlier masking, the row absmax and the rounding (two passes
   over a row tile; IEEE division and no FMA contraction, so the codes equal the reference's bit for
   bit).
2. ``_int8_matmul_kernel`` computes ``x_q W_qᵀ`` with int8 tensor-core ``tl.dot`` (exact int32
   accumulation) and applies ``· s_x[m] · s_w[n] / 127² + b[n]`` in the epilogue before the one
   16-bit store: the int32 product never reaches global memory.
3. The outlier part (a few columns, e.g. < 1% of K) is a small dense ``addmm`` in the activation dtype
   on the dequantized outlier columns, as in bitsandbytes.

Memory traffic per weight element (bytes): 1 (int8 code) + 4/K (s_w), read once per M-tile; the
activations are read twice and written once as int8 (2·itemsize + 1 bytes per element of x).

Backward. ``dx = dy Ŵ`` with ``Ŵ = W_q · s_w/127`` (the whole weight, outliers included, as in
bitsandbytes): ``qtune::linear_llm_int8_grad_input`` is the fused 8-bit kernel of ``matmul_int8.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_device, config, launch, next_pow2, round_half_even, swizzle

CONFIGS = {
    "gemm": [
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    ],
    "gemm_decode": [  # M <= 16: narrow N tiles so that a few rows still fill the GPU
        config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=3),
        config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
        config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=3),
    ],
    "quantize": [
        config(BLOCK_M=1, BLOCK_K=1024, num_warps=4, num_stages=1),
        config(BLOCK_M=4, BLOCK_K=1024, num_warps=8, num_stages=1),
    ],
}
DECODE_MAX_M = 16


@triton.jit
def _quantize_rows_kernel(
    # pointers
    x_ptr,          # [M, K] activations, inner stride 1
    outlier_ptr,    # int8 [K]: 1 for an outlier column (HAS_OUTLIERS only)
    xq_ptr,         # int8 [M, K] out
    sx_ptr,         # fp32 [M] out: row absmax of the non-outlier elements
    # sizes
    M, K,
    # strides
    stride_xm, stride_qm,
    # scalars
    threshold,
    # meta-parameters
    HAS_OUTLIERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m[:, None].to(tl.int64)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        v = tl.abs(tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K),
                           other=0.0).to(tl.float32))
        if HAS_OUTLIERS:
            v = tl.where(v >= threshold, 0.0, v)
        amax = tl.maximum(amax, tl.max(v, axis=1))
    tl.store(sx_ptr + offs_m, amax, mask=mask_m)
    # the reference's 127 / clamp(s_x, 1e-12) is torch's reciprocal-then-multiply; IEEE division (div_rn),
    # not the approximate one `/` compiles to, keeps the codes bit-identical
    inv = (tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), tl.maximum(amax, 1e-12)) * 127.0)[:, None]
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        v = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_OUTLIERS:
            v = tl.where(tl.abs(v) >= threshold, 0.0, v)
        q = round_half_even(v * inv)
        if HAS_OUTLIERS:
            col = tl.load(outlier_ptr + offs_k, mask=offs_k < K, other=0)
            q = tl.where(col[None, :] != 0, 0.0, q)
        tl.store(xq_ptr + rows * stride_qm + offs_k[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _int8_matmul_kernel(
    # pointers
    xq_ptr,         # int8 [M, K], inner stride 1
    w_ptr,          # int8 [N, K], inner stride 1
    sx_ptr,         # fp32 [M] row absmax of the activations
    sw_ptr,         # fp32 [N] row absmax of the weight (SCB)
    bias_ptr,       # [N] in y's dtype (HAS_BIAS only)
    y_ptr,          # [M, N] output dtype
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_wn, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(xq_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        b = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    # epilogue: the reference's order of fp32 operations, acc · (s_x s_w) · 1/127²
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * (sx[:, None] * sw[None, :]) * (1.0 / (127.0 * 127.0))
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)


_QKEY = ["K", "HAS_OUTLIERS"]
_quantize_autotuned = triton.autotune(configs=CONFIGS["quantize"], key=_QKEY)(_quantize_rows_kernel)
_KEY = ["M_BUCKET", "N", "K"]
_mm_gemm = triton.autotune(configs=CONFIGS["gemm"], key=_KEY)(_int8_matmul_kernel)
_mm_decode = triton.autotune(configs=CONFIGS["gemm_decode"], key=_KEY)(_int8_matmul_kernel)


def quantize_rows(x2: torch.Tensor, outlier_cols: Optional[torch.Tensor], threshold: float, *,
                  config: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 quantization of ``x2`` [M, K] without its outliers.

    Args:
        x2: [M, K] fp16/bf16/fp32, inner stride 1. outlier_cols: bool/int8 [K] or None (no outliers).
        threshold: elements with ``|x| ≥ threshold`` are left out of the absmax (when ``outlier_cols``).
    Returns:
        (int8 [M, K] codes with the outlier columns zeroed, fp32 [M] row absmax).
    """
    m, k = x2.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x2.device)
    has_outliers = outlier_cols is not None
    cols = outlier_cols.to(torch.int8).contiguous() if has_outliers else xq
    args = (x2, cols, xq, sx, m, k, x2.stride(0), xq.stride(0), float(threshold))
    kwargs = dict(HAS_OUTLIERS=has_outliers, enable_fp_fusion=False)
    launch(_quantize_rows_kernel, _quantize_autotuned, lambda mt: (triton.cdiv(m, mt["BLOCK_M"]),), args, kwargs,
           config, lambda: {"BLOCK_M": min(64, next_pow2(m)), "BLOCK_K": min(4096, next_pow2(k))})
    return xq, sx


def int8_matmul_scaled(xq: torch.Tensor, weight: torch.Tensor, sx: torch.Tensor, scb: torch.Tensor,
                       bias: Optional[torch.Tensor], dtype: torch.dtype, *,
                       config: Optional[dict] = None) -> torch.Tensor:
    """``(xq Wᵀ) · sx sᵂᵀ / 127² + b`` in ``dtype``: int8 tensor-core GEMM with the scaling epilogue.

    Args:
        xq: int8 [M, K]. weight: int8 [N, K]. sx: fp32 [M]. scb: fp32 [N]. bias: [N] or None.
    Returns:
        [M, N] ``dtype``.
    """
    m, k = xq.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=dtype, device=xq.device)
    b = bias.to(dtype).contiguous() if bias is not None else y
    args = (xq, weight, sx, scb, b, y, m, n, k, next_pow2(m), xq.stride(0), weight.stride(0), y.stride(0))
    kwargs = dict(HAS_BIAS=bias is not None)
    grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(n, mt["BLOCK_N"]),)  # noqa: E731
    launch(_int8_matmul_kernel, _mm_gemm if m > DECODE_MAX_M else _mm_decode, grid, args, kwargs, config,
           lambda: {"BLOCK_M": max(16, min(64, next_pow2(m))), "BLOCK_N": max(16, min(256, next_pow2(n))),
                    "BLOCK_K": max(32, min(256, next_pow2(k))), "GROUP_M": 4})
    return y


def linear_llm_int8(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, threshold: float,
                    bias: Optional[torch.Tensor] = None, *, config: Optional[dict] = None) -> torch.Tensor:
    """LLM.int8() ``y = x Ŵᵀ + b``; the CUDA kernel of ``qtune::linear_llm_int8`` (same arguments).

    Args:
        x: (..., K) float. weight: int8 [N, K]. scb: fp32 [N] per-row absmax. threshold: outlier
            threshold on |x| (0 disables the decomposition). bias: [N] or None.
        config: fixed config of the int8 GEMM; default: autotuned.
    Returns:
        (..., N) in ``x.dtype``.
    Raises:
        ValueError: wrong weight dtype, mismatched shapes, wrong device.
    """
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"linear_llm_int8: weight must be int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear_llm_int8: x has {x.shape[-1]} features, the weight expects {k}")
    if scb.numel() != n:
        raise ValueError(f"linear_llm_int8: scb has {scb.numel()} entries, the weight has {n} rows")
    check_device(x, weight, scb, kernel=_int8_matmul_kernel)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros((*x.shape[:-1], n))
    outlier_cols, cols = None, None
    if threshold > 0.0:
        flags = (x2.abs() >= threshold).any(dim=0)
        cols = flags.nonzero().view(-1)
        if cols.numel():
            outlier_cols = flags
        else:
            cols = None
    xq, sx = quantize_rows(x2, outlier_cols, threshold)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    scb = scb.reshape(-1).float().contiguous()
    y = int8_matmul_scaled(xq, weight, sx, scb, bias, x.dtype, config=config)
    if cols is not None:
        # 16-bit part: the few outlier columns, dequantized (as the reference and bitsandbytes do)
        sub_w = (weight[:, cols].float() * (scb / 127.0).unsqueeze(-1)).to(x.dtype)
        y = y.addmm(x2[:, cols], sub_w.t())
    return y.view(*x.shape[:-1], n)

