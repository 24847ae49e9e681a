"""GGUF (llama.cpp) block formats as qtune formats: the file's blocks kept as they are.

A GGUF tensor of shape [N, K] (N rows of K weights; GGUF writes the dims as ``[K, N]``) in a block type is
stored row by row, each row cut into blocks of ``block_size`` weights, each block ``type_size`` bytes. qtune
keeps exactly those bytes as a ``uint8`` tensor ``[N, K / block_size · type_size]`` (2-D by output row, so
row permutations and sharding along dim 0 move whole blocks) and dequantizes them here. The maths below is
``gguf/quants.py`` (gguf 0.19) operation for operation in fp32, so :func:`dequantize_gguf` equals
``gguf.quants.dequantize`` bit for bit (tests/formats/test_gguf.py checks every type on random blocks and on
the SmolLM2 GGUF).

Block layouts (``d``, ``m``, ``dmin``: fp16; ``qs``: 4-bit codes, two per byte, low nibbles = the first half
of the block, high nibbles = the second half; ``qh``: the fifth bits, bit ``j`` of a little-endian word for
weight ``j``):

====== ===== ======= ==================================== ==========================================
type   block bytes   layout                               weight ``j``
====== ===== ======= ==================================== ==========================================
Q4_0   32    18      d, qs[16]                            ``d · (q − 8)``
Q4_1   32    20      d, m, qs[16]                         ``d · q + m``
Q5_0   32    22      d, qh[4], qs[16]                     ``d · (q − 16)``, ``q = low | high << 4``
Q5_1   32    24      d, m, qh[4], qs[16]                  ``d · q + m``
Q8_0   32    34      d, q[32] (int8)                      ``d · q``
Q4_K   256   144     d, dmin, scales[12], qs[128]         ``(d·sc_s) · q − (dmin·m_s)`` per 32-weight sub-block s
Q5_K   256   176     d, dmin, scales[12], qh[32], qs[128] as Q4_K with a fifth bit
Q6_K   256   210     ql[128], qh[64], scales[16] (int8), d ``(d·sc_s) · (q − 32)`` per 16-weight sub-block s
====== ===== ======= ==================================== ==========================================

Q4_K/Q5_K pack eight 6-bit scales ``sc`` and mins ``m`` in 12 bytes (see :func:`_k_scale_min`).

:func:`quantize_gguf` reproduces ``gguf.quants.quantize`` (the bytes llama.cpp's reference quantizer writes)
for the 32-weight types; the gguf package has no quantizer for the K-quants, and neither has qtune: their
layers come from GGUF files only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import torch
from torch import Tensor

from .base import QuantConfig, check_weight

QK_K = 256


@dataclasses.dataclass(frozen=True)
class GGUFConfig(QuantConfig):
    """Base of the GGUF block formats (not registered itself; one subclass per GGML type).

    Class attributes:
        ggml_type: the ``GGMLQuantizationType`` value (as in the file's tensor info).
        type_name: llama.cpp's name (``Q4_1``).
        block_size: weights per block; ``in_features`` must be a multiple of it.
        type_size: bytes per block.
        can_quantize: qtune (and the gguf package) can quantize a float weight into this type.
        scale_group: weights along a row that share one scale (the block, or a K-quant's sub-block).
        float_offset: each block has an fp16 offset ``m`` (``w = d·q + m``) that a change can be added to exactly.
    """

    op_family: ClassVar[str] = "gguf"
    needs_calibration: ClassVar[bool] = False
    ggml_type: ClassVar[int] = -1
    type_name: ClassVar[str] = ""
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 0
    can_quantize: ClassVar[bool] = True
    scale_group: ClassVar[int] = 32
    float_offset: ClassVar[bool] = False

    @classmethod
    def row_bytes(cls, in_features: int) -> int:
        """Bytes per row of ``in_features`` weights."""
        return in_features // cls.block_size * cls.type_size


@dataclasses.dataclass(frozen=True)
class GGUFQ4_0Config(GGUFConfig):
    """GGUF Q4_0: 32 weights, fp16 scale ``d``: ``w = d·(q − 8)``."""

    format: ClassVar[str] = "gguf_q4_0"
    bits: ClassVar[int] = 4
    ggml_type: ClassVar[int] = 2
    type_name: ClassVar[str] = "Q4_0"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 18


@dataclasses.dataclass(frozen=True)
class GGUFQ4_1Config(GGUFConfig):
    """GGUF Q4_1: 32 weights, fp16 ``d`` and ``m``: ``w = d·q + m`` (a float offset per group)."""

    format: ClassVar[str] = "gguf_q4_1"
    bits: ClassVar[int] = 4
    ggml_type: ClassVar[int] = 3
    type_name: ClassVar[str] = "Q4_1"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 20
    float_offset: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class GGUFQ5_0Config(GGUFConfig):
    """GGUF Q5_0: 32 weights, fp16 ``d``, 5-bit codes: ``w = d·(q − 16)``."""

    format: ClassVar[str] = "gguf_q5_0"
    bits: ClassVar[int] = 5
    ggml_type: ClassVar[int] = 6
    type_name: ClassVar[str] = "Q5_0"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 22


@dataclasses.dataclass(frozen=True)
class GGUFQ5_1Config(GGUFConfig):
    """GGUF Q5_1: 32 weights, fp16 ``d`` and ``m``, 5-bit codes: ``w = d·q + m``."""

    format: ClassVar[str] = "gguf_q5_1"
    bits: ClassVar[int] = 5
    ggml_type: ClassVar[int] = 7
    type_name: ClassVar[str] = "Q5_1"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 24
    float_offset: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class GGUFQ8_0Config(GGUFConfig):
    """GGUF Q8_0: 32 int8 weights, fp16 ``d``: ``w = d·q``."""

    format: ClassVar[str] = "gguf_q8_0"
    bits: ClassVar[int] = 8
    ggml_type: ClassVar[int] = 8
    type_name: ClassVar[str] = "Q8_0"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 34


@dataclasses.dataclass(frozen=True)
class GGUFQ4_KConfig(GGUFConfig):
    """GGUF Q4_K: 256 weights in 8 sub-blocks of 32 with 6-bit scales and mins (read from files only)."""

    format: ClassVar[str] = "gguf_q4_k"
    bits: ClassVar[int] = 4
    ggml_type: ClassVar[int] = 12
    type_name: ClassVar[str] = "Q4_K"
    block_size: ClassVar[int] = QK_K
    type_size: ClassVar[int] = 144
    can_quantize: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class GGUFQ5_KConfig(GGUFConfig):
    """GGUF Q5_K: Q4_K with a fifth bit per weight (read from files only)."""

    format: ClassVar[str] = "gguf_q5_k"
    bits: ClassVar[int] = 5
    ggml_type: ClassVar[int] = 13
    type_name: ClassVar[str] = "Q5_K"
    block_size: ClassVar[int] = QK_K
    type_size: ClassVar[int] = 176
    can_quantize: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class GGUFQ6_KConfig(GGUFConfig):
    """GGUF Q6_K: 256 weights in 16 sub-blocks of 16 with int8 scales, 6-bit codes (read from files only)."""

    format: ClassVar[str] = "gguf_q6_k"
    bits: ClassVar[int] = 6
    ggml_type: ClassVar[int] = 14
    type_name: ClassVar[str] = "Q6_K"
    block_size: ClassVar[int] = QK_K
    type_size: ClassVar[int] = 210
    scale_group: ClassVar[int] = 16
    can_quantize: ClassVar[bool] = False

GGUF_CONFIGS: tuple[type[GGUFConfig], ...] = (GGUFQ4_0Config, GGUFQ4_1Config, GGUFQ5_0Config, GGUFQ5_1Config,
                                              GGUFQ8_0Config, GGUFQ4_KConfig, GGUFQ5_KConfig, GGUFQ6_KConfig)
BY_GGML_TYPE: dict[int, type[GGUFConfig]] = {c.ggml_type: c for c in GGUF_CONFIGS}


def config_for_ggml_type(ggml_type: int) -> type[GGUFConfig] | None:
    """The config class of a GGML type (None: qtune has no layer for it)."""
    return BY_GGML_TYPE.get(int(ggml_type))


# ---------------------------------------------------------------------------------------------------------
# Dequantization (the spec): blocks uint8 [nb, type_size] -> fp32 [nb, block_size]
# ---------------------------------------------------------------------------------------------------------
def _f16(b: Tensor) -> Tensor:
    """Two bytes per row (little-endian fp16) → fp32 [nb, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """[nb, 16] bytes → [nb, 32] codes: low nibbles first, then high nibbles (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: Tensor) -> Tensor:
    """[nb, 4] bytes (a little-endian uint32) → [nb, 32] bits, bit j for weight j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[:, :, None] >> shifts) & 1).reshape(qh.shape[0], 32)


def _deq_q4_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def _deq_q4_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).float() + m


def _deq_q5_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _deq_q5_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return d * q.float() + m


def _deq_q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _k_scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    """12 bytes → eight 6-bit scales and eight 6-bit mins (``gguf.quants.Q4_K.get_scale_min``).

    Bytes 0–3 hold scales 0–3 (low 6 bits) and the top 2 bits of scales 4–7; bytes 4–7 the same for the
    mins; bytes 8–11 the low 4 bits of scales 4–7 (low nibble) and of mins 4–7 (high nibble).
    """
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_sub_nibbles(qs: Tensor) -> Tensor:
    """[nb, 128] → [nb, 8, 32]: sub-block 2i = low nibbles of bytes 32i..32i+31, 2i+1 = their high nibbles."""
    q = qs.reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(-1, 8, 32)


def _deq_q4_k(b: Tensor) -> Tensor:
    nb = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = (d * sc.float()).reshape(nb, -1, 1)
    offset = (dmin * mn.float()).reshape(nb, -1, 1)
    return (scale * _k_sub_nibbles(b[:, 16:]).float() - offset).reshape(nb, QK_K)


def _deq_q5_k(b: Tensor) -> Tensor:
    nb = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = (d * sc.float()).reshape(nb, -1, 1)
    offset = (dmin * mn.float()).reshape(nb, -1, 1)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8, 1)
    qh = ((b[:, 16:48].reshape(nb, 1, 1, 32) >> shifts) & 1).reshape(nb, 8, 32)  # sub-block s: bit s of qh
    q = _k_sub_nibbles(b[:, 48:]) | (qh << 4)
    return (scale * q.float() - offset).reshape(nb, QK_K)


def _deq_q6_k(b: Tensor) -> Tensor:
    nb = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
    scale = (_f16(d) * scales.contiguous().view(torch.int8).float()).reshape(nb, 16, 1)
    lo = ql.reshape(nb, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).reshape(1, 1, 2, 1)
    lo = (lo & 0x0F).reshape(nb, 8, 32)
    hi = qh.reshape(nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    hi = (hi & 0x03).reshape(nb, 8, 32)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(nb, 16, 16)
    return (scale * q.float()).reshape(nb, QK_K)


_DEQUANTIZE: dict[int, Callable[[Tensor], Tensor]] = {
    2: _deq_q4_0, 3: _deq_q4_1, 6: _deq_q5_0, 7: _deq_q5_1, 8: _deq_q8_0, 12: _deq_q4_k, 13: _deq_q5_k, 14: _deq_q6_k,
}


def _config(ggml_type: int) -> type[GGUFConfig]:
    cfg = config_for_ggml_type(ggml_type)
    if cfg is None:
        raise ValueError(f"GGML type {ggml_type} is not one qtune reads "
                         f"({', '.join(c.type_name for c in GGUF_CONFIGS)})")
    return cfg


def dequantize_gguf(blocks: Tensor, ggml_type: int, in_features: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """GGUF blocks → dense weight, equal to ``gguf.quants.dequantize`` (fp32) bit for bit before the cast.

    Args:
        blocks (Tensor): uint8 [N, in_features / block_size · type_size], the file's bytes row by row.
        ggml_type: the GGML type (``GGMLQuantizationType`` value).
        in_features: K, a multiple of the type's block size.
        dtype: the result's dtype (computed in fp32, then cast).
    Returns:
        Tensor [N, in_features] of ``dtype``.
    Raises:
        ValueError: unknown type, or ``blocks`` does not hold ``in_features`` weights per row.
    """
    cfg = _config(ggml_type)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2:
        raise ValueError(f"{cfg.type_name} blocks must be uint8 [N, bytes per row], got {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    if in_features % cfg.block_size or blocks.shape[1] != cfg.row_bytes(in_features):
        raise ValueError(f"{cfg.type_name}: {blocks.shape[1]} bytes per row do not hold {in_features} weights "
                         f"(blocks of {cfg.block_size} weights in {cfg.type_size} bytes)")
    n = blocks.shape[0]
    flat = blocks.contiguous().reshape(-1, cfg.type_size)
    return _DEQUANTIZE[cfg.ggml_type](flat).reshape(n, in_features).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Quantization (gguf.quants.quantize's bytes) for the 32-weight types
# ---------------------------------------------------------------------------------------------------------
def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _f16_bytes(x: Tensor) -> Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _pack_nibbles(q: Tensor) -> Tensor:
    """[nb, 32] codes < 16 → [nb, 16] bytes (weight j low nibble, weight j+16 high nibble)."""
    return q[:, :16] | (q[:, 16:] << 4)


def _pack_high_bits(q: Tensor) -> Tensor:
    """Bit 4 of each of 32 codes → 4 bytes (little-endian bit order)."""
    bits = ((q >> 4) & 1).reshape(-1, 4, 8)
    weights = (2 ** torch.arange(8, device=q.device)).to(torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def _trunc_codes(x: Tensor, top: int) -> Tensor:
    # numpy: np.trunc(...).astype(np.uint8).clip(0, top); the values are ≥ 0 up to float rounding
    return torch.trunc(x).clamp_min(0).to(torch.uint8).clamp_max(top)


def _signed_max(b: Tensor) -> Tensor:
    """The block's value of largest magnitude, with its sign (first one on ties, as numpy's argmax)."""
    return torch.gather(b, 1, b.abs().argmax(dim=1, keepdim=True))


def _q_q4_0(b: Tensor) -> Tensor:
    d = _signed_max(b) / -8
    q = _trunc_codes(b * _inverse(d) + 8.5, 15)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=1)


def _q_q4_1(b: Tensor) -> Tensor:
    mx, mn = b.amax(dim=1, keepdim=True), b.amin(dim=1, keepdim=True)
    d = (mx - mn) / 15
    q = _trunc_codes((b - mn) * _inverse(d) + 0.5, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q)], dim=1)


def _q_q5_0(b: Tensor) -> Tensor:
    d = _signed_max(b) / -16
    q = _trunc_codes(b * _inverse(d) + 16.5, 31)
    return torch.cat([_f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q & 0x0F)], dim=1)


def _q_q5_1(b: Tensor) -> Tensor:
    mx, mn = b.amax(dim=1, keepdim=True), b.amin(dim=1, keepdim=True)
    d = (mx - mn) / 31
    q = _trunc_codes((b - mn) * _inverse(d) + 0.5, 31)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _pack_high_bits(q), _pack_nibbles(q & 0x0F)], dim=1)


def _round_away(x: Tensor) -> Tensor:
    """``gguf.quants.np_roundf``: floor(|x|) + floor(2·frac(|x|)), with x's sign (halves away from zero)."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def _q_q8_0(b: Tensor) -> Tensor:
    d = b.abs().amax(dim=1, keepdim=True) / 127
    q = _round_away(b * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1)


_QUANTIZE: dict[int, Callable[[Tensor], Tensor]] = {2: _q_q4_0, 3: _q_q4_1, 6: _q_q5_0, 7: _q_q5_1, 8: _q_q8_0}


def quantize_gguf(weight: Tensor, ggml_type: int, *, name: str = "weight") -> Tensor:
    """Float [N, K] → GGUF blocks uint8 [N, K / 32 · type_size], the bytes ``gguf.quants.quantize`` writes.

    The weight is rounded to fp32 first (as the gguf package does).

    Raises:
        ValueError: NaN/Inf or bad shape, K not a multiple of 32, or a type without a quantizer (the K-quants);
            the message names ``name``.
    """
    cfg = _config(ggml_type)
    check_weight(weight, name=name)
    if ggml_type not in _QUANTIZE:
        raise ValueError(f"{name}: qtune cannot quantize into {cfg.type_name} (neither can the gguf package); "
                         f"{cfg.format} layers come from GGUF files only")
    n, k = weight.shape
    if k % cfg.block_size:
        raise ValueError(f"{name}: in_features={k} is not a multiple of {cfg.type_name}'s block size {cfg.block_size}")
    blocks = weight.detach().float().reshape(-1, cfg.block_size)
    return _QUANTIZE[cfg.ggml_type](blocks).reshape(n, cfg.row_bytes(k))


__all__ = ["GGUFConfig", "GGUFQ4_0Config", "GGUFQ4_1Config", "GGUFQ5_0Config", "GGUFQ5_1Config", "GGUFQ8_0Config",
           "GGUFQ4_KConfig", "GGUFQ5_KConfig", "GGUFQ6_KConfig", "GGUF_CONFIGS", "BY_GGML_TYPE",
           "config_for_ggml_type", "dequantize_gguf", "quantize_gguf", "QK_K"]
