"""8-bit dequantization kernel (``qtune::dequantize_int8`` on CUDA).

Maths (the spec is :func:`qtune.formats.int8.dequantize_int8`), for ``W`` [N, K] with ``G`` groups of
``group_size`` input columns per row (``group_size = -1``: one group per row, bitsandbytes' ``SCB``)::

    symmetric:   W[n, k] = q[n, k] · (a[n, g] / 127)          q int8,  a = scale (the absmax)
    zero-point:  W[n, k] = (q[n, k] − z[n, g]) · s[n, g]       q uint8, s = scale (the step), z uint8
    g = k // group_size

in fp32, then cast; IEEE division (``div_rn``, not the approximate ``/``) and no FMA contraction, so the
result is the reference's bit for bit. Each program dequantizes a [BLOCK_N, BLOCK_K] tile (128-bit
loads and stores along K); per-row scales, and groups that span whole tiles, are one load per row.

Memory traffic per weight element: 1 B code read + 4/group_size B scale (+ 1/group_size B zero) + 2 B
(fp16/bf16) or 4 B (fp32) written: 3.03 B for int8 → fp16 at group 128, 3 B per row.

Backward: none (frozen weight); the linear layers differentiate through ``matmul_int8.py``.
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
def int8_tile(w_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, G, stride_wn,
              HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``Ŵ[offs_n, k0 : k0+BLOCK_K]`` as [len(offs_n), BLOCK_K] (0 outside the matrix).

    ``GROUP_SIZE = 0``: one scale per row. A group that spans whole tiles (or tiles that span whole
    groups) loads one scale (zero) per row (per row and group) and broadcasts it; any other group width
    gathers per element. Division by 127 is IEEE (``div_rn``), as the reference's.
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k[None, :] < K)
    q = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], mask=mask, other=0)
    q = q.to(tl.float32)
    if GROUP_SIZE == 0 or GROUP_SIZE % BLOCK_K == 0:
        if GROUP_SIZE == 0:
            gi = offs_n * G
        else:
            gi = offs_n * G + k0 // GROUP_SIZE
        s = tl.load(scale_ptr + gi, mask=mask_n, other=0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(zero_ptr + gi, mask=mask_n, other=0).to(tl.float32)
            return (q - z[:, None]) * s[:, None]
        else:
            return q * tl.math.div_rn(s, tl.full(s.shape, 127.0, tl.float32))[:, None]
    elif BLOCK_K % GROUP_SIZE == 0:
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE
        g = k0 // GROUP_SIZE + tl.arange(0, NG)
        gi = offs_n[:, None] * G + g[None, :]
        gmask = mask_n[:, None] & (g[None, :] < G)
        s = tl.load(scale_ptr + gi, mask=gmask, other=0).to(tl.float32)
        q3 = tl.reshape(q, (BLOCK_N, NG, GROUP_SIZE))
        if HAS_ZERO:
            z = tl.load(zero_ptr + gi, mask=gmask, other=0).to(tl.float32)
            w = (q3 - z[:, :, None]) * s[:, :, None]
        else:
            w = q3 * tl.math.div_rn(s, tl.full(s.shape, 127.0, tl.float32))[:, :, None]
        return tl.reshape(w, (BLOCK_N, BLOCK_K))
    else:
        gi = offs_n[:, None] * G + offs_k[None, :] // GROUP_SIZE
        s = tl.load(scale_ptr + gi, mask=mask, other=0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(zero_ptr + gi, mask=mask, other=0).to(tl.float32)
            return (q - z) * s
        else:
            return q * tl.math.div_rn(s, tl.full(s.shape, 127.0, tl.float32))


@triton.jit
def _dequant_int8_kernel(
    # pointers
    w_ptr,       # int8 / uint8 [N, K] codes, inner stride 1
    scale_ptr,   # fp32 [N, G]
    zero_ptr,    # uint8 [N, G]   (HAS_ZERO only)
    out_ptr,     # [N, K] output dtype, inner stride 1
    # sizes
    N, K, G,
    # strides (elements)
    stride_wn, stride_on,
    # meta-parameters
    HAS_ZERO: tl.constexpr,      # zero-point (asymmetric) instead of absmax
    GROUP_SIZE: tl.constexpr,    # input columns per scale; 0 = one scale per row
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = int8_tile(w_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, G, stride_wn, HAS_ZERO, GROUP_SIZE, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask)


_autotuned = triton.autotune(configs=CONFIGS, key=["N", "K", "G", "GROUP_SIZE"])(_dequant_int8_kernel)


def _grid(n: int, k: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], group_size: int,
                    dtype: torch.dtype, *, config: Optional[dict] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense 8-bit weight; the CUDA kernel of ``qtune::dequantize_int8`` (same arguments).

    Args:
        weight: int8 (symmetric) or uint8 (zero-point) [N, K]. scale: fp32 [N, G].
        zero: uint8 [N, G] or None. group_size: -1 (per row) or the group width. dtype: output dtype.
        config: fixed launch config; default: autotuned.
        out: contiguous [N, K] ``dtype`` tensor to write into (e.g. a dispatch workspace); default: new.
    Returns:
        [N, K] ``dtype`` (``out`` when given).
    Raises:
        ValueError: shapes that disagree, wrong device, unfit ``out``.
    """
    if weight.dim() != 2:
        raise ValueError(f"dequantize_int8: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    g = 1 if group_size == -1 else -(-k // group_size)
    scale = scale.reshape(n, -1)
    if scale.shape[1] != g:
        raise ValueError(f"dequantize_int8: scale has {scale.shape[1]} groups per row, group_size={group_size} "
                         f"with K={k} needs {g}")
    if zero is not None and zero.numel() != n * g:
        raise ValueError(f"dequantize_int8: zero has {zero.numel()} elements, expected {n * g}")
    check_device(weight, scale, kernel=_dequant_int8_kernel)
    out = output_buffer(out, (n, k), dtype, weight.device, "dequantize_int8")
    if out.numel() == 0:
        return out
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    scale = scale.float().contiguous()
    zero_t = zero.reshape(n, g).contiguous() if zero is not None else scale
    args = (weight, scale, zero_t, out, n, k, g, weight.stride(0), out.stride(0))
    kwargs = dict(HAS_ZERO=zero is not None, GROUP_SIZE=0 if g == 1 else group_size, enable_fp_fusion=False)
    launch(_dequant_int8_kernel, _autotuned, _grid(n, k), args, kwargs, config,
           lambda: {"BLOCK_N": 64, "BLOCK_K": 1024})
    return out
