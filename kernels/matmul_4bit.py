"""Fused NF4/FP4 dequant-matmul: forward ``y = x·Ŵᵀ + b`` and backward ``dx = dy·Ŵ`` (CUDA kernels of
``qtune::linear_4bit`` and ``qtune::linear_4bit_grad_input``).

Maths. ``Ŵ[n, k] = code[nibble(n·K + k)] · a[(n·K + k) // blocksize]`` (see ``dequant_4bit.py``; with
double quantization the absmax ``a`` is decoded from its 8-bit code in registers). Each program owns
an output tile and walks the reduction dimension. Per step it loads ``BLOCK_K/2`` packed bytes per
weight row (16-byte ``cp.async``/``ld.global.v4`` when rows are 16-byte aligned), looks both nibbles up
in the 16-entry code table held on chip (``tl.gather``: shared memory, not a global load per nibble),
scales them by the row's absmax in fp32 (one absmax per row and step when ``K % blocksize == 0``),
casts to the activation dtype, interleaves the two nibbles (``tl.join``) and feeds ``tl.dot``
(fp16/bf16 tensor cores: ``mma.sync`` on sm_80, ``wgmma`` on sm_90; fp32 accumulation; fp32
activations use 3×TF32 for fp32 accuracy). ``Ŵ`` never exists in global memory. Odd ``K`` (rows that
start mid-byte) addresses every nibble.

Two launch shapes share one kernel:

- tiled GEMM (training, M > 16): grouped tile order for L2 reuse, autotuned tiles, ``SPLIT_K = 1``;
- split-K GEMV (decode, M ≤ 16): ``BLOCK_M = 16`` and the K loop split over ``SPLIT_K`` programs
  that ``atomic_add`` fp32 partial sums (so the last bits of the result depend on the order of the
  additions), so that a handful of rows still fills the GPU.

Memory traffic per weight element (bytes): 0.5 packed + 4/blocksize absmax (1/blocksize + 4/(256·blocksize)
with double quant): 0.5625 (0.516 double-quant) at blocksize 64, read ⌈M/BLOCK_M⌉ times (once per
M-tile; L2 absorbs most re-reads); activations and outputs add (M·K + M·N)·itemsize in total. The
dequantize-then-matmul baseline moves 0.5625 + 2 (write Ŵ) + 2 (read Ŵ) bytes per weight in fp16.

Backward. ``y = x Ŵᵀ + b  ⇒  dx = dy Ŵ`` (``db = Σ dy`` is done by the autograd rule; the weight is
frozen, no ``dŴ``). ``_linear_4bit_bwd_kernel`` tiles ``dx`` [M, K] and reduces over N, dequantizing
the same packed tiles (no transposed copy of the weight is needed: the tile is consumed as [N, K]);
same traffic per weight element, read ⌈M/BLOCK_M⌉ times; split over N for M ≤ 16.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (autotuners, check_device, config, config_set, deterministic_decode, dot_in_fp32,
                      dot_precision, fixed_config, launch, next_pow2, reduction_buffer, split_of, swizzle)
from .dequant_4bit import dequantize_4bit, load_absmax

# Autotune config lists, picked per launch by ``config_set``. BLOCK_K counts weights (BLOCK_K/2 bytes per
# row and step). "fwd"/"bwd": 16-bit tiled GEMM (M > 16); "_fp32": smaller tiles for 3×TF32; "_odd_k":
# odd K (per-nibble addressing); "_decode": M ≤ 16, split over the reduction dimension with atomics.
# In backward (dx = dy·Ŵ) tiles cover (M, K) and the reduction runs over N (BLOCK_N, SPLIT_N).
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
    "fwd_odd_k": [
        config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=3),
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


@triton.jit
def lookup(table, idx):
    """``table[idx]`` for a 16-entry register tensor and an index tensor of any 2-D shape.

    ``tl.gather`` keeps the table on chip (shared memory, conflict-free); indexing global memory instead
    would let the software pipeliner turn every nibble into its own 4-byte ``cp.async``.
    """
    flat = tl.reshape(idx, (idx.shape[0] * idx.shape[1],))
    return tl.reshape(tl.gather(table, flat, 0), (idx.shape[0], idx.shape[1]))


@triton.jit
def w4_tile(packed_ptr, absmax_ptr, table, nested_absmax_ptr, nested_code_ptr, nested_offset,
            offs_n, k0, N, K, stride_wn, dtype: tl.constexpr,
            BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """``Ŵ[offs_n, k0 : k0+BLOCK_K]`` dequantized to ``dtype``, shape [len(offs_n), BLOCK_K].

    ``table`` is the 16-entry fp32 code table (registers). ``k0`` is a multiple of BLOCK_K. Entries
    outside the matrix are finite (masked loads give 0 bytes and 0 scales, or the nested offset with
    double quant); callers multiply them by zero-padded activations or mask the store.
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    if EVEN_K:
        # rows start on byte boundaries: load [BLOCK_N, BLOCK_K/2] bytes, split nibbles, interleave
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = (offs_n[:, None] < N) & (offs_b[None, :] < K // 2)
        byte = tl.load(packed_ptr + offs_n[:, None] * stride_wn + offs_b[None, :], mask=mask, other=0).to(tl.int32)
        hi = lookup(table, byte >> 4)
        lo = lookup(table, byte & 15)
        if ROW_ALIGNED and BLOCKSIZE % BLOCK_K == 0:
            # K % BLOCKSIZE == 0 and BLOCK_K divides it: each tile row lies in one block -> one absmax per row
            blk = offs_n * (K // BLOCKSIZE) + k0 // BLOCKSIZE
            scale = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, blk,
                                offs_n < N, DOUBLE_QUANT)[:, None]
        elif ROW_ALIGNED:
            blk = (offs_n * (K // BLOCKSIZE))[:, None] + (2 * offs_b[None, :]) // BLOCKSIZE
            scale = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, blk, mask,
                                DOUBLE_QUANT)
        else:
            # blocks straddle rows: 64-bit math per row (N·K may exceed 2³¹), 32-bit per element
            row = offs_n.to(tl.int64) * K
            rem = (row % BLOCKSIZE).to(tl.int32)
            blk = (row // BLOCKSIZE)[:, None] + (rem[:, None] + 2 * offs_b[None, :]) // BLOCKSIZE
            scale = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, blk, mask,
                                DOUBLE_QUANT)
        w = tl.join((hi * scale).to(dtype), (lo * scale).to(dtype))
        return tl.reshape(w, (BLOCK_N, BLOCK_K))
    else:
        # odd K: rows start mid-byte; address every nibble. 64-bit math only per row, 32-bit per element.
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        row = offs_n.to(tl.int64) * K                          # flat index of each row's first weight
        t = (row & 1).to(tl.int32)[:, None] + offs_k[None, :]  # nibble index from the row's first byte
        byte = tl.load(packed_ptr + (row >> 1)[:, None] + (t >> 1), mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((1 - (t & 1)) * 4)) & 15
        rem = (row % BLOCKSIZE).to(tl.int32)
        blk = (row // BLOCKSIZE)[:, None] + (rem[:, None] + offs_k[None, :]) // BLOCKSIZE
        scale = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, blk, mask,
                            DOUBLE_QUANT)
        return (lookup(table, nib) * scale).to(dtype)


@triton.jit
def _linear_4bit_fwd_kernel(
    # pointers
    x_ptr,              # [M, K] activations (fp16/bf16/fp32), inner stride 1
    packed_ptr,         # uint8, row n at byte n·stride_wn when K is even, else flat
    absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
    bias_ptr,           # [N] in x's dtype (HAS_BIAS only)
    y_ptr,              # [M, N]: x's dtype, or fp32 zeros when SPLIT_K > 1 (atomic accumulation)
    # sizes
    M, N, K,
    M_BUCKET,           # next power of two of M: the autotuning key, not used in the body
    # strides (elements / bytes for packed)
    stride_xm, stride_wn, stride_ym,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    DOT_FP32: tl.constexpr,        # interpreter only: bf16 dot on fp32 operands
    DOT_PRECISION: tl.constexpr,   # tl.dot input_precision for fp32 activations
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = x_ptr.dtype.element_ty
    table = tl.load(code_ptr + tl.arange(0, 16)).to(tl.float32)
    nested_offset = 0.0
    if DOUBLE_QUANT:
        nested_offset = tl.load(nested_offset_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = w4_tile(packed_ptr, absmax_ptr, table, nested_absmax_ptr, nested_code_ptr, nested_offset,
                    offs_n, k0, N, K, stride_wn, dtype, BLOCKSIZE, DOUBLE_QUANT, EVEN_K, ROW_ALIGNED, BLOCK_K)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
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
def _linear_4bit_bwd_kernel(
    # pointers
    dy_ptr,             # [M, N] output gradient, inner stride 1
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
    dx_ptr,             # [M, K]: dy's dtype, or fp32 zeros when SPLIT_N > 1
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_dym, stride_wn, stride_dxm,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_N: tl.constexpr,
):
    pid_m, pid_k = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    dtype = dy_ptr.dtype.element_ty
    table = tl.load(code_ptr + tl.arange(0, 16)).to(tl.float32)
    nested_offset = 0.0
    if DOUBLE_QUANT:
        nested_offset = tl.load(nested_offset_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(pid_s * BLOCK_N, N, BLOCK_N * SPLIT_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = w4_tile(packed_ptr, absmax_ptr, table, nested_absmax_ptr, nested_code_ptr, nested_offset,
                    offs_n, k0, N, K, stride_wn, dtype, BLOCKSIZE, DOUBLE_QUANT, EVEN_K, ROW_ALIGNED, BLOCK_K)
        if DOT_FP32:
            acc = tl.dot(dy.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    dx = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :]
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    if SPLIT_N == 1:
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(dx, acc, mask=mask, sem="relaxed")


_KEY = ["M_BUCKET", "N", "K", "BLOCKSIZE", "DOUBLE_QUANT", "EVEN_K"]
_TUNERS = autotuners(CONFIGS, _linear_4bit_fwd_kernel, _linear_4bit_bwd_kernel, _KEY, "y_ptr", "dx_ptr")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _weight_args(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape, what):
    n, k = int(shape[0]), int(shape[1])
    double_quant = absmax.dtype == torch.uint8
    if double_quant and (nested_absmax is None or nested_code is None or nested_offset is None):
        raise ValueError(f"{what}: a uint8 (double-quantized) absmax needs nested_absmax, nested_code, nested_offset")
    if blocksize % 2 or blocksize <= 0:
        raise ValueError(f"{what}: blocksize={blocksize} must be a positive even number")
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if flat.numel() * 2 < n * k:
        raise ValueError(f"{what}: packed holds {flat.numel()} bytes, shape {tuple(shape)} needs {(n * k + 1) // 2}")
    code = code.float().contiguous()
    if double_quant:
        nested = (nested_absmax.float().contiguous(), nested_code.float().contiguous(),
                  nested_offset.float().reshape(1))
    else:
        nested = (code, code, code)  # placeholders, never read
    tensors = (flat, absmax.contiguous(), code, *nested)
    meta = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, EVEN_K=k % 2 == 0, ROW_ALIGNED=k % blocksize == 0)
    return n, k, tensors, meta


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                nested_offset: Optional[torch.Tensor], blocksize: int, shape: Sequence[int],
                bias: Optional[torch.Tensor] = None, *, config: Optional[dict] = None) -> torch.Tensor:
    """Fused ``y = x Ŵᵀ + b``; the CUDA kernel of ``qtune::linear_4bit`` (same arguments).

    Args:
        x: (..., K) fp16/bf16/fp32. packed/absmax/code/nested_*/blocksize/shape: the NF4/FP4 weight
            (see ``qtune.formats.nf4``), shape = (N, K). bias: [N] or None.
        config: fixed launch config (a dict of meta-parameters with SPLIT_K, num_warps, num_stages);
            default: autotuned, split-K GEMV configs for M ≤ 16 and tiled GEMM configs above.
    Returns:
        (..., N) in ``x.dtype``.
    Raises:
        ValueError: inconsistent weight tensors, ``x`` with the wrong number of features, wrong device.
    """
    n, k, wt, meta = _weight_args(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape,
                                  "linear_4bit")
    if x.shape[-1] != k:
        raise ValueError(f"linear_4bit: x has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype not in SUPPORTED_DTYPES:  # e.g. fp64: dense fallback, still through the Triton dequantize
        w = dequantize_4bit(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    check_device(x, *wt, kernel=_linear_4bit_fwd_kernel)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros((*x.shape[:-1], n))
    cfg = fixed_config(config, "SPLIT_K", m, n, k)
    y = reduction_buffer(m, n, x2, split_of(cfg, "SPLIT_K", m, DECODE_MAX_M))
    b = bias.to(x.dtype).contiguous() if bias is not None else x2
    args = (x2, *wt, b, y, m, n, k, next_pow2(m), x2.stride(0), k // 2, y.stride(0))
    kwargs = dict(meta, HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.dtype, _linear_4bit_fwd_kernel),
                  DOT_PRECISION=dot_precision(x.dtype))
    grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(n, mt["BLOCK_N"]), mt["SPLIT_K"])  # noqa: E731
    tuner = _TUNERS[config_set("fwd", m, x.dtype, DECODE_MAX_M, odd_k=not meta["EVEN_K"])]
    launch(_linear_4bit_fwd_kernel, tuner, grid, args, kwargs, cfg)
    return y.to(x.dtype).view(*x.shape[:-1], n)


def linear_4bit_grad_input(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                           nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                           nested_offset: Optional[torch.Tensor], blocksize: int, shape: Sequence[int], *,
                           config: Optional[dict] = None) -> torch.Tensor:
    """Fused ``dx = dy Ŵ``; the CUDA kernel of ``qtune::linear_4bit_grad_input`` (same arguments).

    Args:
        grad_out: (..., N) fp16/bf16/fp32. The weight arguments as in :func:`linear_4bit`.
        config: fixed launch config (with SPLIT_N); default: autotuned.
    Returns:
        (..., K) in ``grad_out.dtype``.
    """
    n, k, wt, meta = _weight_args(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape,
                                  "linear_4bit_grad_input")
    if grad_out.shape[-1] != n:
        raise ValueError(f"linear_4bit_grad_input: grad_out has {grad_out.shape[-1]} features, the weight has {n} rows")
    if grad_out.dtype not in SUPPORTED_DTYPES:
        w = dequantize_4bit(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape,
                            grad_out.dtype)
        return torch.matmul(grad_out, w)
    check_device(grad_out, *wt, kernel=_linear_4bit_bwd_kernel)
    dy = grad_out.reshape(-1, n)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    m = dy.shape[0]
    if m == 0 or k == 0:
        return grad_out.new_zeros((*grad_out.shape[:-1], k))
    cfg = fixed_config(config, "SPLIT_N", m, n, k)
    dx = reduction_buffer(m, k, dy, split_of(cfg, "SPLIT_N", m, DECODE_MAX_M))
    args = (dy, *wt, dx, m, n, k, next_pow2(m), dy.stride(0), k // 2, dx.stride(0))
    kwargs = dict(meta, DOT_FP32=dot_in_fp32(dy.dtype, _linear_4bit_bwd_kernel), DOT_PRECISION=dot_precision(dy.dtype))
    grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(k, mt["BLOCK_K"]), mt["SPLIT_N"])  # noqa: E731
    tuner = _TUNERS[config_set("bwd", m, dy.dtype, DECODE_MAX_M, odd_k=not meta["EVEN_K"])]
    launch(_linear_4bit_bwd_kernel, tuner, grid, args, kwargs, cfg)
    return dx.to(dy.dtype).view(*grad_out.shape[:-1], k)
