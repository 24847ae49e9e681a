"""GPTQ dequantization kernel (``qtune::dequantize_gptq`` on CUDA), 2/3/4/8-bit with ``g_idx``.

Maths (the spec is :func:`qtune.formats.gptq.dequantize_gptq`, checkpoint format v1)::

    W[n, k] = scales[g, n] · (q[k, n] − z[g, n]),   g = g_idx[k],   z = (stored field + 1) mod 2^BITS

in fp32, then cast (bit-identical to the reference). ``q`` is packed along the input dimension: every
32 rows form a little-endian ``32·b``-bit stream over ``b`` int32 words, row ``i`` at stream bits
``[b·i, b·i + b)``. :func:`gptq_codes` loads each word once and shifts its codes out in registers (at 3
bits rows 10 and 21 straddle two words of the same 32-row block, which are loaded anyway). The zero
points are packed the same way along the output dimension. Without act-order (``g_idx = k // g``,
detected once per ``g_idx`` tensor) a tile's scales and zeros are one or a few rows, broadcast; with
act-order ``g_idx`` is read per input row and the scales and zeros are gathered, so act-order
checkpoints need no reordering.

Memory traffic per weight element: b/8 B codes + (2 + b/8)/group_size B scale and zero (+ 4/N B g_idx
with act-order) read, plus 2 B (fp16/bf16) or 4 B (fp32) written: 2.52 B for 4-bit → fp16 at group 128.

Backward: none (frozen weight); the linear layers differentiate through ``matmul_gptq.py``.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_device, config, launch, next_pow2, output_buffer

CONFIGS = [  # BLOCK_K: a multiple of 32 (whole packed words)
    config(BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=1),
    config(BLOCK_K=128, BLOCK_N=128, num_warps=8, num_stages=1),
    config(BLOCK_K=32, BLOCK_N=256, num_warps=4, num_stages=1),
]


@triton.jit
def unpack_bits(ptr, row, col, stride, mask, BITS: tl.constexpr):
    """Codes number ``row`` (dim 0) of the bit streams packed along dim 0 of an int32 matrix.

    ``row`` and ``col`` broadcast against each other; returns int32 codes in ``[0, 2^BITS)``.
    """
    bit = (row % 32) * BITS
    word = (row // 32) * BITS + bit // 32
    shift = (bit % 32).to(tl.uint32)
    w = tl.load(ptr + word * stride + col, mask=mask, other=0).to(tl.uint32, bitcast=True)
    q = w >> shift
    if BITS == 3:
        # rows 10 and 21 of each 32 (shift 30 and 31) continue in the next word
        straddle = shift > 29
        w2 = tl.load(ptr + (word + 1) * stride + col, mask=mask & straddle, other=0).to(tl.uint32, bitcast=True)
        q = q | (w2 << tl.where(straddle, 32 - shift, 0))
    return (q & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def gptq_codes(qweight_ptr, k0, offs_n, N, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes ``q[k0 : k0+BLOCK_K, offs_n]`` as [BLOCK_K, len(offs_n)] (0 past the padded K).

    ``k0`` and ``BLOCK_K`` are multiples of 32. Each packed word is loaded once ([BLOCK_K·BITS/32, BN]
    words, contiguous along N) and its codes are shifted out in registers; at 3 bits the three words of
    each 32-row block are loaded as three tiles and every code picks its word(s) by its (constant) bit
    position, so the straddling codes 10 and 21 need no extra load.
    """
    BN: tl.constexpr = offs_n.shape[0]
    n_rows = (K + 31) // 32 * BITS
    mask_n = offs_n[None, :] < N
    if BITS == 3:
        B32: tl.constexpr = BLOCK_K // 32
        r = (k0 // 32 + tl.arange(0, B32)) * 3          # first word of each 32-row block
        mask = (r[:, None] < n_rows) & mask_n
        base = qweight_ptr + r[:, None] * N + offs_n[None, :]
        w0 = tl.load(base, mask=mask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        w1 = tl.load(base + N, mask=mask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        w2 = tl.load(base + 2 * N, mask=mask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        bit = tl.arange(0, 32) * 3
        sel = (bit // 32)[None, :, None]
        shift = (bit % 32).to(tl.uint32)[None, :, None]
        lo = tl.where(sel == 0, w0, tl.where(sel == 1, w1, w2))
        hi = tl.where(sel == 0, w1, w2)
        q = (lo >> shift) | tl.where(shift > 29, hi << ((32 - shift) & 31), 0)
        return tl.reshape(q & 7, (BLOCK_K, BN)).to(tl.int32)
    else:
        PER: tl.constexpr = 32 // BITS
        R: tl.constexpr = BLOCK_K // PER
        r = k0 // PER + tl.arange(0, R)
        mask = (r[:, None] < n_rows) & mask_n
        w = tl.load(qweight_ptr + r[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
        shift = (tl.arange(0, PER) * BITS).to(tl.uint32)
        q = (w[:, None, :] >> shift[None, :, None]) & ((1 << BITS) - 1)
        return tl.reshape(q, (BLOCK_K, BN)).to(tl.int32)


@triton.jit
def gptq_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, k0, offs_n, N, K, stride_z,
              BITS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """fp32 ``Ŵᵀ[k0 : k0+BLOCK_K, offs_n]`` = ``scales[g, n] · (q[k, n] − z[g, n])``, [BLOCK_K, len(offs_n)].

    ``GROUP_SIZE > 0`` promises ``g_idx[k] = k // GROUP_SIZE`` (no act-order): then the scales and zeros
    of a tile are one row (GROUP_SIZE a multiple of BLOCK_K) or BLOCK_K/GROUP_SIZE rows, loaded once and
    broadcast. ``GROUP_SIZE = 0`` reads ``g_idx`` and gathers per input row (act-order). Entries outside
    the matrix are finite (masked loads give 0); callers mask stores or multiply by zero-padded inputs.
    """
    BN: tl.constexpr = offs_n.shape[0]
    q = gptq_codes(qweight_ptr, k0, offs_n, N, K, BITS, BLOCK_K)
    mask_n = offs_n < N
    if GROUP_SIZE > 0 and GROUP_SIZE % BLOCK_K == 0:
        g = k0 // GROUP_SIZE
        s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        z = (unpack_bits(qzeros_ptr + g * stride_z, offs_n, 0, 1, mask_n, BITS) + 1) & ((1 << BITS) - 1)
        return s[None, :] * (q - z[None, :]).to(tl.float32)
    elif GROUP_SIZE > 0 and BLOCK_K % GROUP_SIZE == 0:
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE
        g = k0 // GROUP_SIZE + tl.arange(0, NG)
        mask = (g[:, None] < tl.cdiv(K, GROUP_SIZE)) & mask_n[None, :]
        s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
        z = (unpack_bits(qzeros_ptr + g[:, None] * stride_z, offs_n[None, :], 0, 1, mask, BITS) + 1) & ((1 << BITS) - 1)
        w = s[:, None, :] * (tl.reshape(q, (NG, GROUP_SIZE, BN)) - z[:, None, :]).to(tl.float32)
        return tl.reshape(w, (BLOCK_K, BN))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if GROUP_SIZE > 0:
            g = offs_k // GROUP_SIZE
        else:
            g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        mask = mask_k[:, None] & mask_n[None, :]
        s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
        z = (unpack_bits(qzeros_ptr + g[:, None] * stride_z, offs_n[None, :], 0, 1, mask, BITS) + 1) & ((1 << BITS) - 1)
        return s * (q - z).to(tl.float32)


@triton.jit
def _dequant_gptq_kernel(
    # pointers
    qweight_ptr,   # int32 [ceil(K/32)·BITS, N]
    qzeros_ptr,    # int32 [G, ceil(N/32)·BITS]  (zero − 1)
    scales_ptr,    # float [G, N]
    g_idx_ptr,     # int32 [K]
    out_ptr,       # [N, K] output dtype
    # sizes
    N, K,
    # strides (elements)
    stride_z,      # row stride of qzeros
    stride_on,     # row stride of out
    # meta-parameters
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,     # g_idx[k] == k // GROUP_SIZE, or 0 to read g_idx (act-order)
    BLOCK_K: tl.constexpr,        # a multiple of 32
    BLOCK_N: tl.constexpr,
):
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = gptq_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, k0, offs_n, N, K, stride_z, BITS, BLOCK_K,
                  GROUP_SIZE)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    # the tile is [k, n]; out is [n, k] row-major (the compiler transposes through shared memory)
    out = out_ptr + offs_n[None, :].to(tl.int64) * stride_on + offs_k[:, None]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


_autotuned = triton.autotune(configs=CONFIGS, key=["N", "K", "BITS", "GROUP_SIZE"])(_dequant_gptq_kernel)

# id(g_idx) -> (weak reference, (version, n_groups, K), group size or 0): one device sync per weight,
# not per call. (A WeakKeyDictionary would compare tensors with ==, which is elementwise.)
_GROUP_SIZES: dict[int, tuple] = {}


def trivial_group_size(g_idx: torch.Tensor, n_groups: int, k: int) -> int:
    """``g`` when ``g_idx == arange(K) // g`` (no act-order), else 0 (the kernels then read ``g_idx``).

    The answer is cached per ``g_idx`` tensor (and its version counter), so the device sync of the
    comparison happens once per layer. A single group (``g_idx`` all zero) reports a power of two ≥ K.
    """
    key = (g_idx._version, n_groups, k)
    hit = _GROUP_SIZES.get(id(g_idx))
    if hit is not None and hit[0]() is g_idx and hit[1] == key:
        return hit[2]
    gs = 0
    if k > 0 and g_idx.numel() == k:
        cand = int((g_idx == 0).sum())
        if cand > 0 and torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // cand):
            gs = next_pow2(max(cand, 32)) if cand >= k else cand
    tid = id(g_idx)
    try:
        ref = weakref.ref(g_idx, lambda _r, tid=tid: _GROUP_SIZES.pop(tid, None))
    except TypeError:  # not weakly referenceable: don't cache
        return gs
    _GROUP_SIZES[tid] = (ref, key, gs)
    return gs


def _grid(n: int, k: int):
    return lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]))


def check_gptq_args(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, in_features: int, what: str) -> tuple[int, int]:
    """Validate GPTQ tensors (cheap shape checks, no device sync). Returns ``(N, K)``."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{what}: bits={bits} is not one of 2, 3, 4, 8")
    if scales.dim() != 2:
        raise ValueError(f"{what}: scales must be [G, N], got shape {tuple(scales.shape)}")
    n = scales.shape[1]
    k = int(in_features)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (-(-k // 32) * bits, n):
        raise ValueError(f"{what}: qweight {qweight.dtype} {tuple(qweight.shape)} does not hold K={k}, N={n} at "
                         f"{bits} bits (expected int32 [{-(-k // 32) * bits}, {n}])")
    if tuple(qzeros.shape) != (scales.shape[0], -(-n // 32) * bits):
        raise ValueError(f"{what}: qzeros shape {tuple(qzeros.shape)} does not match scales {tuple(scales.shape)}")
    if g_idx.numel() != k:
        raise ValueError(f"{what}: g_idx has {g_idx.numel()} entries, in_features={k}")
    return n, k


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, in_features: int, dtype: torch.dtype, *,
                    config: Optional[dict] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense GPTQ weight; the CUDA kernel of ``qtune::dequantize_gptq`` (same arguments).

    Args:
        qweight: int32 [ceil(K/32)·bits, N]. qzeros: int32 [G, ceil(N/32)·bits]. scales: float [G, N].
        g_idx: int [K]. bits: 2, 3, 4 or 8. in_features: K. dtype: output dtype.
        config: fixed launch config; default: autotuned.
        out: contiguous [N, K] ``dtype`` tensor to write into (e.g. a dispatch workspace); default: new.
    Returns:
        [N, K] ``dtype`` (``out`` when given).
    Raises:
        ValueError: shapes that disagree, wrong device, unfit ``out``.
    """
    n, k = check_gptq_args(qweight, qzeros, scales, g_idx, bits, in_features, "dequantize_gptq")
    check_device(qweight, qzeros, scales, g_idx, kernel=_dequant_gptq_kernel)
    out = output_buffer(out, (n, k), dtype, qweight.device, "dequantize_gptq")
    if out.numel() == 0:
        return out
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    if config is not None and config["BLOCK_K"] % 32:
        raise ValueError(f"dequantize_gptq: BLOCK_K={config['BLOCK_K']} must be a multiple of 32 (whole packed words)")
    group_size = trivial_group_size(g_idx, scales.shape[0], k)
    g_idx = g_idx.to(torch.int32).contiguous()
    args = (qweight, qzeros, scales, g_idx, out, n, k, qzeros.stride(0), out.stride(0))
    kwargs = dict(BITS=bits, GROUP_SIZE=group_size, enable_fp_fusion=False)
    launch(_dequant_gptq_kernel, _autotuned, _grid(n, k), args, kwargs, config,
           lambda: {"BLOCK_K": 512, "BLOCK_N": 256})
    return out
