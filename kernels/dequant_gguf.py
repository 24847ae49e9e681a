"""GGUF block dequantization kernel (``qtune::dequantize_gguf`` on CUDA): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q4_K, Q5_K, Q6_K, reading the file's blocks as they are stored.

Maths (the spec is :func:`qtune.formats.gguf.dequantize_gguf`, itself ``gguf.quants.dequantize`` operation
for operation). The weight is uint8 ``[N, K / block · type_size]``: row ``n`` is ``K / block`` blocks of
``type_size`` bytes (layouts in the table of ``qtune/formats/gguf.py``). Weight ``j`` of a block is, with
``d``, ``m``, ``dmin`` the block's fp16 fields read as fp32::

    Q4_0  d · (q − 8)        q = nibble j                  (low nibbles: j < 16, high: j ≥ 16)
    Q4_1  d · q + m
    Q5_0  d · (q − 16)       q = nibble | bit j of qh << 4
    Q5_1  d · q + m
    Q8_0  q · d              q = int8 byte j
    Q4_K  (d·sc_s) · q − (dmin·m_s)      s = j // 32, 6-bit sc/m unpacked from 12 bytes
    Q5_K  as Q4_K, q = nibble | bit s of qh[j % 32] << 4
    Q6_K  (d·sc_s) · (q − 32)             s = j // 16, sc int8, q = 4 low bits | 2 high bits << 4

Every product and sum is one fp32 operation in the reference's order, and the kernel is compiled without
FMA contraction, so the fp32 result equals the reference bit for bit; 16-bit outputs are its cast.

Tiles. :func:`gguf_tile` forms ``Ŵ[offs_n, k0 : k0 + BLOCK_K]`` as a 4-D tile [rows, blocks, sub-blocks,
weights per sub-block] (sub-block: 32 weights, 16 for Q6_K; the 32-weight types have one): the block's
fp16 fields and the K-quants' sub-block scales are loaded once per (row, block, sub-block) and broadcast,
the codes once per weight (a byte serves its two nibbles from L1). ``BLOCK_K`` is a power of two ≥ 32:
a tile is whole blocks, or part of one 256-weight block. The fused matmuls (``matmul_gguf.py``) call the
same function, so both branches of the dispatcher compute the same ``Ŵ``.

Memory traffic per weight element: ``type_size / block`` B read (0.5625 Q4_0, 0.625 Q4_1, 0.6875 Q5_0,
0.75 Q5_1, 1.0625 Q8_0, 0.5625 Q4_K, 0.6875 Q5_K, 0.8203 Q6_K), plus 2 B (fp16/bf16) or 4 B (fp32) written.

Backward: none (frozen weight); the linear layers differentiate through ``matmul_gguf.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qtune.formats.gguf import GGUFConfig, config_for_ggml_type

from ._common import check_device, config, launch, next_pow2, output_buffer

CONFIGS = [  # BLOCK_K: a power of two ≥ 32 (whole 32-weight sub-blocks)
    config(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=1),
    config(BLOCK_N=32, BLOCK_K=256, num_warps=8, num_stages=1),
    config(BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=1),
]

# GGML type -> llama.cpp name: the types the kernels decode (they branch on the type at compile time)
TYPES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


@triton.jit
def _u8(ptr, off, mask):
    """Bytes at ``ptr + off`` as int32 (0 where masked)."""
    return tl.load(ptr + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, off, mask):
    """The little-endian fp16 at bytes ``off, off + 1``, as fp32 (0 where masked)."""
    lo = tl.load(ptr + off, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + off + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def gguf_tile(w_ptr, offs_n, k0, N, K, TYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``Ŵ[offs_n, k0 : k0 + BLOCK_K]`` as [len(offs_n), BLOCK_K] (0 outside the matrix).

    ``w_ptr``: uint8 blocks [N, K / BS · TS], rows contiguous. ``k0`` is a multiple of ``BLOCK_K``
    (a power of two ≥ 32), so the tile covers whole blocks or a part of one block made of whole
    sub-blocks.
    """
    BS: tl.constexpr = 256 if TYPE >= 12 else 32
    TS: tl.constexpr = (18 if TYPE == 2 else 20 if TYPE == 3 else 22 if TYPE == 6 else 24 if TYPE == 7 else
                        34 if TYPE == 8 else 144 if TYPE == 12 else 176 if TYPE == 13 else 210)
    SS: tl.constexpr = 16 if TYPE == 14 else 32        # weights per sub-block (one scale)
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < BS else BS
    NB: tl.constexpr = BLOCK_K // SUB                  # blocks in the tile
    NS: tl.constexpr = SUB // SS                       # sub-blocks per block in the tile
    BN: tl.constexpr = offs_n.shape[0]
    nblk = K // BS
    b = k0 // BS + tl.arange(0, NB)
    blk = (offs_n.to(tl.int64) * (nblk * TS))[:, None, None, None] + (b * TS)[None, :, None, None]  # [BN,NB,1,1]
    mb = (offs_n < N)[:, None, None, None] & (b < nblk)[None, :, None, None]
    s = ((k0 % BS) // SS + tl.arange(0, NS))[None, None, :, None]    # sub-block of the block, [1,1,NS,1]
    t = tl.arange(0, SS)[None, None, None, :]                         # weight of the sub-block
    j = s * SS + t                                                    # weight of the block, [1,1,NS,SS]
    # masks of each load's own shape (Triton 3.4 broadcasts a mask to the pointers, never the pointers to it)
    ms = mb & (s >= 0)                                                # [BN,NB,NS,1]
    me = ms & (t >= 0)                                                # [BN,NB,NS,SS]
    if TYPE == 2:
        d = _f16(w_ptr, blk, mb)
        q = (_u8(w_ptr, blk + 2 + j % 16, me) >> ((j // 16) * 4)) & 15
        w = d * (q - 8).to(tl.float32)
    elif TYPE == 3:
        d = _f16(w_ptr, blk, mb)
        m = _f16(w_ptr, blk + 2, mb)
        q = (_u8(w_ptr, blk + 4 + j % 16, me) >> ((j // 16) * 4)) & 15
        w = d * q.to(tl.float32) + m
    elif TYPE == 6:
        d = _f16(w_ptr, blk, mb)
        hb = (_u8(w_ptr, blk + 2 + j // 8, me) >> (j % 8)) & 1
        q = ((_u8(w_ptr, blk + 6 + j % 16, me) >> ((j // 16) * 4)) & 15) | (hb << 4)
        w = d * (q - 16).to(tl.float32)
    elif TYPE == 7:
        d = _f16(w_ptr, blk, mb)
        m = _f16(w_ptr, blk + 2, mb)
        hb = (_u8(w_ptr, blk + 4 + j // 8, me) >> (j % 8)) & 1
        q = ((_u8(w_ptr, blk + 8 + j % 16, me) >> ((j // 16) * 4)) & 15) | (hb << 4)
        w = d * q.to(tl.float32) + m
    elif TYPE == 8:
        d = _f16(w_ptr, blk, mb)
        q = tl.load(w_ptr + blk + 2 + j, mask=me, other=0).to(tl.int8, bitcast=True)
        w = q.to(tl.float32) * d
    elif TYPE == 12 or TYPE == 13:
        d = _f16(w_ptr, blk, mb)
        dmin = _f16(w_ptr, blk + 2, mb)
        # 12 scale bytes: sc_s, m_s (s < 4) in the low 6 bits of bytes s, 4 + s; for s ≥ 4 the low 4 bits
        # in byte 8 + s − 4 (sc low nibble, m high nibble), the top 2 in bits 6-7 of bytes s − 4, s
        i = s % 4
        a = _u8(w_ptr, blk + 4 + i, ms)
        bm = _u8(w_ptr, blk + 8 + i, ms)
        c = _u8(w_ptr, blk + 12 + i, ms)
        sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 2) & 48))
        mn = tl.where(s < 4, bm & 63, (c >> 4) | ((bm >> 2) & 48))
        scale = d * sc.to(tl.float32)
        offset = dmin * mn.to(tl.float32)
        QS: tl.constexpr = 16 if TYPE == 12 else 48
        # sub-blocks 2i and 2i + 1: low and high nibbles of bytes 32i .. 32i + 31
        q = (_u8(w_ptr, blk + QS + 32 * (s // 2) + t, me) >> ((s % 2) * 4)) & 15
        if TYPE == 13:
            # bit s of qh[t]: the 32 qh bytes are loaded once for all sub-blocks ([BN, NB, 1, SS])
            q = q | (((_u8(w_ptr, blk + 16 + t, mb & (t >= 0)) >> s) & 1) << 4)
        w = scale * q.to(tl.float32) - offset
    else:  # Q6_K: ql[128], qh[64], scales[16] (int8), d
        h = j // 128
        r = j % 128
        lo = (_u8(w_ptr, blk + h * 64 + r % 64, me) >> ((r // 64) * 4)) & 15
        hi = (_u8(w_ptr, blk + 128 + h * 32 + r % 32, me) >> ((r // 32) * 2)) & 3
        sc = tl.load(w_ptr + blk + 192 + s, mask=ms, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        scale = _f16(w_ptr, blk + 208, mb) * sc
        w = scale * ((lo | (hi << 4)) - 32).to(tl.float32)
    return tl.reshape(w, (BN, BLOCK_K))


@triton.jit
def _dequant_gguf_kernel(
    # pointers
    w_ptr,         # uint8 [N, K / BS · TS], the file's blocks
    out_ptr,       # [N, K] output dtype
    # sizes
    N, K,
    # strides (elements)
    stride_on,     # row stride of out
    # meta-parameters
    TYPE: tl.constexpr,        # GGML type
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,     # a power of two ≥ 32
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = gguf_tile(w_ptr, offs_n, tl.program_id(0) * BLOCK_K, N, K, TYPE, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    out = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


_autotuned = triton.autotune(configs=CONFIGS, key=["N", "K", "TYPE"])(_dequant_gguf_kernel)


def check_gguf_args(weight: torch.Tensor, ggml_type: int, in_features: int, what: str) -> tuple[type[GGUFConfig], int, int]:
    """Validate GGUF blocks for a kernel (shape and dtype only). Returns ``(config class, N, K)``.

    Raises:
        ValueError: a GGML type without a kernel, non-uint8 or non-2-D blocks, ``in_features`` not a
            multiple of the block size, or rows of the wrong byte count.
    """
    cfg = config_for_ggml_type(int(ggml_type))
    if cfg is None or cfg.ggml_type not in TYPES:
        raise ValueError(f"{what}: GGML type {ggml_type} has no kernel (types: "
                         f"{', '.join(f'{v}={k}' for k, v in TYPES.items())})")
    if weight.dtype != torch.uint8 or weight.dim() != 2:
        raise ValueError(f"{what}: {cfg.type_name} blocks must be uint8 [N, bytes per row], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    k = int(in_features)
    if k % cfg.block_size or weight.shape[1] != cfg.row_bytes(k):
        raise ValueError(f"{what}: {cfg.type_name} rows of {weight.shape[1]} bytes do not hold in_features={k} "
                         f"(blocks of {cfg.block_size} weights in {cfg.type_size} bytes)")
    return cfg, weight.shape[0], k


def _grid(n: int, k: int):
    return lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]))


def check_block_k(block_k: int, what: str) -> None:
    if block_k < 32 or block_k & (block_k - 1):
        raise ValueError(f"{what}: BLOCK_K={block_k} must be a power of two ≥ 32 (whole 32-weight sub-blocks)")


def dequantize_gguf(weight: torch.Tensor, ggml_type: int, in_features: int, dtype: torch.dtype, *,
                    config: Optional[dict] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense GGUF weight; the CUDA kernel of ``qtune::dequantize_gguf`` (same arguments).

    Args:
        weight: uint8 [N, K / block · type_size], the GGUF blocks row by row.
        ggml_type: GGML type (2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0, 12 Q4_K, 13 Q5_K, 14 Q6_K).
        in_features: K, a multiple of the type's block size. dtype: output dtype.
        config: fixed launch config (BLOCK_N, BLOCK_K, num_warps, num_stages); default: autotuned.
        out: contiguous [N, K] ``dtype`` tensor to write into (e.g. a dispatch workspace); default: new.
    Returns:
        [N, K] ``dtype`` (``out`` when given): the fp32 reference cast to ``dtype``.
    Raises:
        ValueError: unknown type, blocks that do not hold K weights per row, wrong device, unfit ``out``.
    """
    cfg, n, k = check_gguf_args(weight, ggml_type, in_features, "dequantize_gguf")
    check_device(weight, kernel=_dequant_gguf_kernel)
    out = output_buffer(out, (n, k), dtype, weight.device, "dequantize_gguf")
    if out.numel() == 0:
        return out
    if config is not None:
        check_block_k(config["BLOCK_K"], "dequantize_gguf")
    weight = weight.contiguous()
    args = (weight, out, n, k, out.stride(0))
    kwargs = dict(TYPE=cfg.ggml_type, enable_fp_fusion=False)
    launch(_dequant_gguf_kernel, _autotuned, _grid(n, k), args, kwargs, config,
           lambda: {"BLOCK_N": max(1, min(64, next_pow2(n))), "BLOCK_K": max(32, min(1024, next_pow2(k)))})
    return out
