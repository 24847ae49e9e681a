r"""GPTQ: int-N weights with per-group scales and zero points, found with second-order error compensation.

This module is the reference (the specification) of qtune's GPTQ format. It holds the configs, the
GPTQ and round-to-nearest (RTN) quantizers, the packing of the checkpoint tensors and the
dequantization every faster kernel must reproduce.

Storage (AutoGPTQ ``qlinear_cuda_old`` / GPTQModel ``FORMAT.GPTQ``, checkpoint format v1), for a layer
with ``N = out_features``, ``K = in_features``, ``b = bits``, group size ``g`` and ``G = ceil(K / g)``:

* ``qweight``: int32 ``[ceil(K/32)·b, N]``. The int-b codes ``q[k, n]`` are packed along the input
  dimension: every 32 consecutive rows form a little-endian bit stream of ``32·b`` bits spread over
  ``b`` words, code ``i`` of the 32 at stream bits ``[b·i, b·i + b)``. For b ∈ {2, 4, 8} this is
  "row ``r·(32/b) + j`` sits in word ``r`` at bits ``[b·j, b·j + b)``"; for b = 3 codes 10 and 21
  straddle word boundaries. ``K`` that is not a multiple of 32 is padded with zero codes.
* ``qzeros``: int32 ``[G, ceil(N/32)·b]``, the zero points packed the same way along the output
  dimension. v1 stores ``zero − 1`` (so symmetric 4-bit gives ``0x77777777``); in memory each field
  holds ``(zero − 1) mod 2^b``, in checkpoints a zero of 0 follows GPTQModel's whole-word encoding
  (see :func:`qzeros_from_checkpoint`).
* ``scales``: ``[G, N]``, fp16 in checkpoints.
* ``g_idx``: int32 ``[K]``, the group of each input column: ``k // g`` unless act-order without static
  groups reorders them.

Dequantization (v1)::

    W[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n]),   z = (stored field + 1) mod 2^b

Group parameters (GPTQ's ``Quantizer.find_params``), per output row over the group's columns, with
``maxq = 2^b − 1``::

    xmin = min(0, min w),  xmax = max(0, max w)                    (0 is always inside the range)
    sym:  xmax = max(|xmin|, xmax), xmin = −xmax, zero = 2^(b−1)
    all-zero group: xmin, xmax = −1, +1
    scale = (xmax − xmin) / maxq,   asym: zero = round(−xmin / scale)
    q     = clamp(round(w / scale) + zero, 0, maxq)

Two departures from the reference keep ``|w − ŵ| ≤ scale/2`` for every weight: the scale is rounded
*up* to the storage dtype before the codes are chosen (so dequantization reproduces exactly what the
quantizer assumed), and an asymmetric group whose zero rounds to 0, which per-field v1 readers cannot
read, gets zero 1
with the scale widened to ``xmax / (maxq − 1)``. The reference's symmetric rule also differs for an
all-non-negative group (it keeps ``xmin = 0`` and clips the group's top weights); here it is absmax.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") minimises the layer's output error ``‖X Wᵀ − X Ŵᵀ‖²`` over calibration inputs ``X``
one input column at a time. With ``H = 2/n · Σ x xᵀ`` (the Hessian of that error with respect to
each row of ``W``) and ``U`` the upper Cholesky factor of ``H⁻¹``, quantizing column ``j`` to ``q_j``
is followed by the optimal update of the not-yet-quantized columns::

    e_j     = (w_j − q_j) / U[j, j]
    w_{j:} ← w_{j:} − e_j · U[j, j:]

Updates inside a block of ``block_size`` columns are applied immediately (one BLAS rank-1 update per
column, on the transposed weight so that a column is a contiguous row); those to the columns after
the block are batched into one matrix product per block ("lazy batch"), which gives the same result.
Act-order (``desc_act``) processes the columns by descending ``diag(H)`` so the most
activation-heavy ones are quantized while the most freedom is left to compensate them; with static groups
(qtune's default, see :class:`GPTQConfig`) the group parameters come from the original column groups, so the
codes keep their column order and ``g_idx = k // g``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import torch

from .base import CliOption, QuantConfig, check_weight

__all__ = [
    "GPTQConfig",
    "RTNConfig",
    "GPTQTensors",
    "GPTQHessian",
    "pack_rows",
    "unpack_rows",
    "pack_zeros",
    "unpack_zeros",
    "qzeros_from_checkpoint",
    "qzeros_to_checkpoint",
    "dequantize_gptq",
    "quantize_rtn",
    "gptq_quantize",
    "gptq_quantize_from_inputs",
]

SUPPORTED_BITS = (2, 3, 4, 8)
_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def _check_bits(bits: object, *, what: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{what}={bits!r} is not supported; choose one of 2, 3, 4, 8")


def _check_group_size(group_size: object, *, what: str) -> None:
    # Group size 1 would store a scale per weight; anything >= 2 works, including a partial last group.
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size >= 2):
        raise ValueError(f"{what}={group_size!r} is not supported; use -1 (one group per row) or an integer >= 2 "
                         "(usually 32, 64, 128)")


def _check_bool(value: object, *, what: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{what}={value!r} must be a bool")


# the CLI flags RTN and GPTQ share (same fields, same meaning)
_GRID_OPTIONS = (
    CliOption("bits", "code width (default 4)", choices=SUPPORTED_BITS),
    CliOption("group_size", "-1: one group per row (default 128)"),
    CliOption("sym", "symmetric grid (default)", type=bool, switch=False),
)


@dataclasses.dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """Settings of GPTQ quantization (names follow AutoGPTQ/GPTQModel ``quantize_config.json``).

    The default ordering is act-order with static groups (``desc_act=True, static_groups=True``): the
    columns are quantized by descending Hessian diagonal, but every group's scale and zero are fitted up
    front on the original contiguous column groups, so the codes are stored un-permuted with
    ``g_idx = k // group_size``. Inference then needs no gather (the fused kernels' ``trivial_group_size``
    path) and the checkpoint says ``desc_act: false`` (see :mod:`qtune.integrations.layouts.gptq`). On
    SmolLM2-135M, GPTQ-4 g128, 128×512 Emma calibration windows, perplexity on 16,384 Persuasion tokens:
    act-order with static groups 42.523, group-aware order 44.140 (qtune's previous default), GPTQModel 7.7's
    default (group-aware) 44.008 (``bench/results/perplexity-gptq128*.json``); at 32 windows 42.59 against
    44.04 (``bench/results/perplexity-gptq-order.json``).

    The three ordering fields combine as follows (with ``group_size=-1`` there is one group, and only
    ``desc_act`` matters):

    * default (``desc_act``, ``static_groups``): act-order, parameters fitted up front on the original
      groups; ``g_idx = k // g``.
    * ``static_groups=False``: classic act-order, parameters fitted on each run of ``g`` quantized columns
      as it starts; ``g_idx`` permuted (kernels gather scales and zeros per input row).
    * ``desc_act=False``: group-aware order, parameters fitted on each (compensated) group as it starts;
      ``g_idx = k // g``.
    * ``desc_act=False, act_group_aware=False``: the natural column order; ``g_idx = k // g``.

    Attributes:
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns sharing one scale/zero per output row; -1 = one group per row.
        desc_act: act-order, quantize columns by descending Hessian diagonal. The default.
        sym: symmetric grid (zero fixed at 2^(bits-1)) instead of a per-group min/max zero.
        static_groups: with ``desc_act``, compute all group parameters up front on the original column
            groups (of the weight before any error compensation), so ``g_idx`` stays ``k // group_size``.
            The default. Ignored without ``desc_act``: the groups are then quantized whole, each fitted on
            its error-compensated columns when it starts. (GPTQModel 7.7 applies ``static_groups`` whatever
            ``desc_act`` says: without act-order it quantizes in the natural order with the up-front
            parameters; its default is ``static_groups=False``.)
        act_group_aware: group-aware reordering (GAR, Gafni et al. 2025; GPTQModel's
            ``act_group_aware``, also its default): whole groups are quantized in descending order of
            their largest Hessian diagonal, and the columns inside each group by descending diagonal.
            Groups stay contiguous, so ``g_idx`` stays ``k // group_size``, and the group parameters are
            still fitted on the error-compensated columns. Used only without ``desc_act`` (which orders
            all columns), and not with ``group_size=-1``; ``desc_act=False`` alone gives this order,
            ``act_group_aware=False`` with it the natural order.
        damp_percent: fraction of mean(diag H) added to the diagonal before inverting, in (0, 1).
        true_sequential: quantize the sub-layers of a block one after another, each calibrated on the
            outputs of the already-quantized ones (read by the model-level driver, not here).
        block_size: lazy-batch width of the column loop; does not change the result.
    """

    format: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    op_family: ClassVar[str] = "gptq"
    cli_options: ClassVar[tuple[CliOption, ...]] = (
        *_GRID_OPTIONS,
        CliOption("desc_act", "act-order: columns by descending Hessian diagonal (default; --no-act-order: "
                  "group-aware order, see --act-group-aware)", flag="--act-order", type=bool, switch=False),
        CliOption("static_groups", "with --act-order, group scales/zeros fitted up front on the original column "
                  "groups, g_idx = k // group_size (default; --no-static-groups: classic act-order, permuted "
                  "g_idx)", type=bool, switch=False),
        CliOption("act_group_aware", "without act-order, whole groups by importance, g_idx = k // group_size "
                  "(default with --no-act-order; --no-act-group-aware: natural column order)", type=bool,
                  switch=False),
        CliOption("damp_percent", "fraction of mean(diag H) added to the diagonal (default 0.01)", type=float),
        CliOption("true_sequential", "calibrate each block's layers group by group (default)", type=bool, switch=False),
    )
    bits: int = 4
    group_size: int = 128
    desc_act: bool = True
    sym: bool = True
    static_groups: bool = True
    act_group_aware: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        _check_bits(self.bits, what=f"{cls}.bits")
        _check_group_size(self.group_size, what=f"{cls}.group_size")
        for field in ("desc_act", "sym", "static_groups", "act_group_aware", "true_sequential"):
            _check_bool(getattr(self, field), what=f"{cls}.{field}")
        dp = self.damp_percent
        if isinstance(dp, bool) or not isinstance(dp, (int, float)) or not (0.0 < dp < 1.0):
            raise ValueError(f"{cls}.damp_percent={dp!r} must be a number in (0, 1); 0.01 is usual, "
                             "0.1 for layers whose Hessian is ill-conditioned")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"{cls}.block_size={bs!r} must be a positive integer (128 is usual)")

    @property
    def ordering(self) -> str:
        """The column order and group fitting these fields select, with the guards above applied:
        ``"act-order-static"``, ``"act-order"`` (permuted ``g_idx``), ``"group-aware"`` or ``"natural"``."""
        if self.desc_act:
            return "act-order-static" if self.static_groups else "act-order"
        return "group-aware" if self.act_group_aware and self.group_size != -1 else "natural"

    def without_calibration(self) -> "RTNConfig":
        """The round-to-nearest config on the same grid (bits, group size, symmetry, compute dtype): what a
        weight gets when it has too few calibration inputs for a Hessian (e.g. an expert the router rarely
        picks). Its tensors have the same shapes and layout as GPTQ's (``g_idx = k // group_size``)."""
        return RTNConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, compute_dtype=self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest int-N per group, stored in the GPTQ tensors: the baseline GPTQ must beat.

    Attributes:
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns sharing one scale/zero per output row; -1 = one group per row.
        sym: symmetric grid (zero fixed at 2^(bits-1)) instead of a per-group min/max zero.
    """

    format: ClassVar[str] = "rtn"
    op_family: ClassVar[str] = "gptq"
    cli_options: ClassVar[tuple[CliOption, ...]] = _GRID_OPTIONS
    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        _check_bits(self.bits, what=f"{cls}.bits")
        _check_group_size(self.group_size, what=f"{cls}.group_size")
        _check_bool(self.sym, what=f"{cls}.sym")


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------
def _stream_layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where code ``i`` of a 32-code block lands: its word, its shift, whether it straddles into the next word."""
    offset = torch.arange(32, device=device, dtype=torch.int64) * bits
    word, shift = offset // 32, offset % 32
    return word, shift, shift + bits > 32


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2^32) as int32 with the same 32 bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int-``bits`` codes along dim 0 into int32 words, in the AutoGPTQ v1 layout.

    Every 32 rows become ``bits`` words; row ``i`` of a 32-row block occupies stream bits
    ``[bits·i, bits·i + bits)``, least-significant first (3-bit codes 10 and 21 straddle two words).
    ``K`` not a multiple of 32 is padded with zero rows.

    Args:
        q (Tensor): ``[K, N]`` integer codes in ``[0, 2**bits)``, any integer dtype.
        bits (int): 2, 3, 4 or 8.

    Returns:
        Tensor: ``[ceil(K/32)·bits, N]`` int32.

    Raises:
        TypeError: ``q`` is not an integer tensor.
        ValueError: unsupported ``bits``, ``q`` not 2-D, or a code out of range.
    """
    _check_bits(bits)
    if not isinstance(q, torch.Tensor) or q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise TypeError(f"pack_rows: expected an integer tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() != 2:
        raise ValueError(f"pack_rows: expected a 2-D tensor [K, N], got shape {tuple(q.shape)}")
    maxq = 2**bits - 1
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > maxq):
        raise ValueError(f"pack_rows: codes must lie in [0, {maxq}] for bits={bits}, "
                         f"got range [{int(q.min())}, {int(q.max())}]")
    rows, cols = q.shape
    blocks = -(-rows // 32)
    # int64 so that shifting a code to bit 31 cannot overflow; the words are cast to int32 at the end.
    padded = torch.zeros(blocks * 32, cols, dtype=torch.int64, device=q.device)
    padded[:rows] = q
    padded = padded.view(blocks, 32, cols)

    word, shift, straddle = _stream_layout(bits, q.device)
    out = torch.zeros(blocks, bits, cols, dtype=torch.int64, device=q.device)
    # Codes occupy disjoint bits, so adding them into their words is the same as OR-ing them.
    low = (padded << shift.view(1, 32, 1)) & _MASK32
    out.index_add_(1, word, low)
    if bool(straddle.any()):
        pos = straddle.nonzero().flatten()
        high = padded[:, pos] >> (32 - shift[pos]).view(1, -1, 1)
        out.index_add_(1, word[pos] + 1, high)
    return _to_int32_bits(out.view(blocks * bits, cols))


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`.

    Args:
        packed (Tensor): ``[ceil(rows/32)·bits, N]`` int32.
        bits (int): 2, 3, 4 or 8.
        rows (int): number of rows ``K`` to return (drops the padding).

    Returns:
        Tensor: ``[rows, N]`` int32 codes in ``[0, 2**bits)``.

    Raises:
        TypeError: ``packed`` is not int32.
        ValueError: unsupported ``bits`` or a shape that does not match ``rows``.
    """
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32:
        raise TypeError(f"unpack_rows: expected an int32 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    blocks = -(-rows // 32)
    if packed.dim() != 2 or packed.shape[0] != blocks * bits or rows < 0:
        raise ValueError(f"unpack_rows: packed shape {tuple(packed.shape)} does not hold {rows} rows at {bits} bits "
                         f"(expected [{blocks * bits}, N])")
    cols = packed.shape[1]
    words = (packed.to(torch.int64) & _MASK32).view(blocks, bits, cols)
    word, shift, straddle = _stream_layout(bits, packed.device)
    codes = words[:, word] >> shift.view(1, 32, 1)  # [blocks, 32, cols]
    if bool(straddle.any()):
        pos = straddle.nonzero().flatten()
        codes[:, pos] |= words[:, word[pos] + 1] << (32 - shift[pos]).view(1, -1, 1)
    codes &= 2**bits - 1
    return codes.reshape(blocks * 32, cols)[:rows].to(torch.int32)


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack zero points into v1 ``qzeros``: ``(zero − 1) mod 2^bits`` per field, along the output dimension.

    This is qtune's in-memory encoding. A zero of 0 is stored as all ones in its field (modular), which
    per-field readers (AutoGPTQ, exllama) would read as ``2^bits``; qtune's quantizers never produce it,
    and checkpoints are converted to and from GPTQModel's whole-word encoding by :func:`qzeros_from_checkpoint`
    and :func:`qzeros_to_checkpoint`.

    Args:
        zeros (Tensor): ``[G, N]`` integer zero points in ``[0, 2**bits)``.
        bits (int): 2, 3, 4 or 8.

    Returns:
        Tensor: ``[G, ceil(N/32)·bits]`` int32.

    Raises:
        TypeError: ``zeros`` is not an integer tensor.
        ValueError: a zero outside ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if not isinstance(zeros, torch.Tensor) or zeros.dtype.is_floating_point or zeros.dtype == torch.bool:
        raise TypeError(f"pack_zeros: expected an integer tensor, got {getattr(zeros, 'dtype', type(zeros).__name__)}")
    if zeros.dim() != 2:
        raise ValueError(f"pack_zeros: expected a 2-D tensor [G, N], got shape {tuple(zeros.shape)}")
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= 2**bits):
        raise ValueError(f"pack_zeros: zero points must lie in [0, {2**bits - 1}] for bits={bits}, "
                         f"got range [{int(zeros.min())}, {int(zeros.max())}]")
    return pack_rows(((zeros.to(torch.int64) - 1) % 2**bits).T, bits).T.contiguous()


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_zeros`: ``zero = (field + 1) mod 2^bits``.

    Args:
        qzeros (Tensor): ``[G, ceil(out_features/32)·bits]`` int32.
        bits (int): 2, 3, 4 or 8.
        out_features (int): ``N``.

    Returns:
        Tensor: ``[G, N]`` int32 zero points in ``[0, 2**bits)``.
    """
    return ((unpack_rows(qzeros.T.contiguous(), bits, out_features).T + 1) % 2**bits).to(torch.int32).contiguous()


# 1 in every field of a 32-bit word (2-, 4- and 8-bit fields never straddle words)
_FIELD_ONES = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


def qzeros_from_checkpoint(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """v1 ``qzeros`` as written by GPTQ tools → qtune's per-field encoding (:func:`pack_zeros`).

    GPTQModel converts its zero points to v1 by subtracting 1 from every field of a whole 32-bit word,
    so a zero of 0 borrows from the next field, and reads them back by adding ``0x11111111``
    (2/4/8-bit; 3-bit fields are shifted one by one, modulo 8). Decoding the same way reads its
    asymmetric checkpoints right; for every other v1 file (zero points ≥ 1, as AutoGPTQ writes) the
    two decodings agree, and this returns the stored words unchanged.
    """
    _check_bits(bits)
    if bits == 3:
        return qzeros.contiguous()
    words = ((qzeros.to(torch.int64) & _MASK32) + _FIELD_ONES[bits]) & _MASK32
    zeros = unpack_rows(_to_int32_bits(words).T.contiguous(), bits, out_features).T
    return pack_zeros(zeros, bits)


def qzeros_to_checkpoint(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """qtune's per-field ``qzeros`` → the v1 words GPTQ tools read (inverse of :func:`qzeros_from_checkpoint`).

    Identical to the input unless a zero point is 0, which is written as GPTQModel writes it (whole-word
    subtraction with borrow).
    """
    _check_bits(bits)
    if bits == 3:
        return qzeros.contiguous()
    zeros = unpack_zeros(qzeros, bits, out_features)
    words = pack_rows(zeros.T, bits).T.to(torch.int64) & _MASK32
    return _to_int32_bits((words - _FIELD_ONES[bits]) & _MASK32).contiguous()


# --------------------------------------------------------------------------------------------------
# Packed tensors and dequantization
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GPTQTensors:
    """The checkpoint tensors of one GPTQ layer (v1) and the metadata needed to read them.

    Attributes:
        qweight (Tensor): ``[ceil(K/32)·bits, N]`` int32.
        qzeros (Tensor): ``[G, ceil(N/32)·bits]`` int32, zero − 1.
        scales (Tensor): ``[G, N]``, fp16 unless quantized with another ``scale_dtype``.
        g_idx (Tensor): ``[K]`` int32 group of each input column.
        bits (int), in_features (int): ``K``, out_features (int): ``N``, group_size (int): -1 or >= 2.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    in_features: int
    out_features: int
    group_size: int

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[N, K]`` these tensors encode (see :func:`dequantize_gptq`)."""
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                               self.in_features, dtype=dtype)


def check_gptq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                       bits: int, in_features: int) -> None:
    """Check that v1 GPTQ tensors agree with each other (see :func:`dequantize_gptq`); ``ValueError`` if not."""
    _check_bits(bits)
    if scales.dim() != 2 or not scales.dtype.is_floating_point:
        raise ValueError(f"dequantize_gptq: scales must be a float [G, N] tensor, "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    n_groups, out_features = scales.shape
    packed_cols = -(-out_features // 32) * bits
    if qzeros.dim() != 2 or tuple(qzeros.shape) != (n_groups, packed_cols):
        raise ValueError(f"dequantize_gptq: qzeros shape {tuple(qzeros.shape)} does not match "
                         f"scales {tuple(scales.shape)} "
                         f"at {bits} bits (expected [{n_groups}, {packed_cols}])")
    if g_idx.dim() != 1 or g_idx.shape[0] != in_features:
        raise ValueError(f"dequantize_gptq: g_idx shape {tuple(g_idx.shape)} does not match in_features={in_features}")
    if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ValueError(f"dequantize_gptq: g_idx values must lie in [0, {n_groups}), "
                         f"got range [{int(g_idx.min())}, {int(g_idx.max())}]")
    if qweight.dim() != 2 or qweight.shape[1] != out_features:
        raise ValueError(f"dequantize_gptq: qweight shape {tuple(qweight.shape)} does not match "
                         f"out_features={out_features}")


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization of v1 GPTQ tensors; the specification of the Triton kernels.

    ``W[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n])`` with ``z`` = (stored field + 1) mod 2^b,
    computed in fp32 and cast to ``dtype`` once at the end.

    Args:
        qweight (Tensor): ``[ceil(K/32)·bits, N]`` int32.
        qzeros (Tensor): ``[G, ceil(N/32)·bits]`` int32.
        scales (Tensor): ``[G, N]`` float (fp16/bf16/fp32).
        g_idx (Tensor): ``[K]`` integer, values in ``[0, G)``.
        bits (int): 2, 3, 4 or 8.
        in_features (int): ``K``.
        dtype (torch.dtype): dtype of the result.

    Returns:
        Tensor: ``[N, K]`` of ``dtype``.

    Raises:
        ValueError: shapes that disagree with each other, or ``g_idx`` out of range.
    """
    check_gptq_tensors(qweight, qzeros, scales, g_idx, bits, in_features)
    out_features = scales.shape[1]
    q = unpack_rows(qweight, bits, in_features)  # [K, N]
    z = unpack_zeros(qzeros, bits, out_features)  # [G, N]
    g = g_idx.long()
    w = scales.float()[g] * (q - z[g]).float()  # [K, N]
    return w.T.contiguous().to(dtype)


# --------------------------------------------------------------------------------------------------
# Group parameters (GPTQ's Quantizer.find_params)
# --------------------------------------------------------------------------------------------------
def _round_scale_up(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 scales to values ``scale_dtype`` holds exactly, never downwards, never to zero.

    The codes are chosen with the scale that will be stored, so dequantization reproduces exactly what
    the quantizer (and GPTQ's error compensation) assumed. Rounding up keeps the group's range covered
    (rounding down could clip the largest weight by more than half a step).
    """
    stored = scale.to(scale_dtype)
    up = stored.float() < scale
    if bool(up.any()):
        stored = torch.where(up, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    smallest = torch.nextafter(torch.zeros((), dtype=scale_dtype), torch.ones((), dtype=scale_dtype))
    return torch.clamp(stored, min=smallest).float()


def _group_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype,
                  name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each group from its min and max (fp32 tensors of any shape).

    Returns ``(scale, zero)``, both fp32 of the input's shape; scale is representable in ``scale_dtype``
    and positive, zero holds integers in ``[1, 2**bits − 1]``.
    """
    maxq = 2**bits - 1
    # Like the reference, 0 is always inside the range: an all-positive group still starts at 0.
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    if sym:
        # Deliberately absmax on both sides even for an all-non-negative group. The reference only
        # mirrors xmin when it is negative, so such a group gets scale = xmax/maxq with zero 2^(b-1)
        # and its largest weights are clipped to about half their value.
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    # An all-zero group gets a unit range so its scale is not 0 (the zeros are still exact: q = zero).
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = _round_scale_up((xmax - xmin) / maxq, scale_dtype)
    if sym:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.round(-xmin / scale)
        # v1 stores zero − 1 in `bits` bits, so a zero of 0 has no per-field encoding (AutoGPTQ's packer
        # wraps it to all ones and corrupts the neighbouring zeros; AutoGPTQ/exllama readers take all ones
        # for 2^b; only GPTQModel's whole-word encoding holds it). To stay readable everywhere, such
        # a group (min ≈ 0) gets zero 1 and a scale widened to xmax/(maxq−1), so that the shifted grid
        # [−scale, (maxq−1)·scale] still covers [xmin, xmax] and the error stays within half a step.
        low = zero < 1
        if bool(low.any()):
            widened = _round_scale_up(xmax / (maxq - 1), scale_dtype)
            scale = torch.where(low, widened, scale)
            zero = torch.clamp(zero, 1, maxq)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{name}: a group's range ({float((xmax - xmin).max()):.4g}) overflows {scale_dtype} scales; "
                         "pass scale_dtype=torch.float32")
    return scale, zero


def _quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _check_cfg(cfg: object, allowed: tuple[type, ...], fn: str) -> None:
    if not isinstance(cfg, allowed):
        names = " or ".join(c.__name__ for c in allowed)
        raise TypeError(f"{fn}: cfg must be a {names}, got {type(cfg).__name__}")


def _pack_result(codes_kn: torch.Tensor, scales_gn: torch.Tensor, zeros_gn: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, group_size: int, scale_dtype: torch.dtype) -> GPTQTensors:
    in_features, out_features = codes_kn.shape
    return GPTQTensors(
        qweight=pack_rows(codes_kn.to(torch.int64), bits),
        qzeros=pack_zeros(zeros_gn.to(torch.int64), bits),
        scales=scales_gn.to(scale_dtype).contiguous(),
        g_idx=g_idx.to(torch.int32),
        bits=bits, in_features=in_features, out_features=out_features, group_size=group_size,
    )


# --------------------------------------------------------------------------------------------------
# Round-to-nearest
# --------------------------------------------------------------------------------------------------
def quantize_rtn(weight: torch.Tensor, cfg: RTNConfig | GPTQConfig, name: str = "weight", *,
                 scale_dtype: torch.dtype = torch.float16) -> GPTQTensors:
    """Round-to-nearest int-N per group, in the GPTQ tensors (uses ``bits``, ``group_size``, ``sym``).

    Every element satisfies ``|W − dequantize(quantize_rtn(W))| ≤ scale/2`` (up to fp32 rounding).

    Args:
        weight (Tensor): ``[N, K]`` float (fp16/bf16/fp32/fp64).
        cfg (RTNConfig | GPTQConfig): bits, group size and symmetry.
        name (str): layer name for error messages.
        scale_dtype (torch.dtype): dtype of ``scales`` (fp16 like checkpoints).

    Returns:
        GPTQTensors: with ``g_idx = k // group_size``.

    Raises:
        TypeError: non-float weight or a wrong config type.
        ValueError: NaN/Inf, non-2-D or empty weight; a range too large for ``scale_dtype``.
    """
    _check_cfg(cfg, (RTNConfig, GPTQConfig), "quantize_rtn")
    check_weight(weight, name=name)
    n, k = weight.shape
    gs = k if cfg.group_size == -1 else cfg.group_size
    n_groups = -(-k // gs)
    w = weight.float()
    # Zero padding of the partial last group does not move its min/max: 0 is always in the range.
    padded = torch.nn.functional.pad(w, (0, n_groups * gs - k)).view(n, n_groups, gs)
    scale, zero = _group_params(padded.amin(-1), padded.amax(-1), cfg.bits, cfg.sym, scale_dtype, name)  # [N, G]
    codes = _quantize_codes(padded, scale.unsqueeze(-1), zero.unsqueeze(-1), 2**cfg.bits - 1)
    codes = codes.view(n, n_groups * gs)[:, :k]
    g_idx = torch.arange(k, device=weight.device) // gs
    return _pack_result(codes.T, scale.T, zero.T, g_idx, cfg.bits, cfg.group_size, scale_dtype)


# --------------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------------
class GPTQHessian:
    """Streaming accumulator of ``H = 2/n · Σ x xᵀ`` over calibration inputs of one linear layer.

    Kept as a running average in fp32 (``H ← H·n/(n+m) + 2/(n+m)·XᵀX``) so it stays O(1) in size
    whatever the number of tokens. ``n`` counts input vectors (tokens); the reference counts
    sequences instead, a constant factor that changes neither the damping (relative to mean diag H)
    nor the result.

    Args:
        in_features (int): ``K``.
        device (torch.device | str | None): where ``H`` lives (CPU by default).
    """

    #: width of the row bands of the symmetric accumulation (:meth:`add_batch`)
    band: int = 256

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"GPTQHessian: in_features={in_features!r} must be a positive integer")
        self.in_features = in_features
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._nsamples = 0
        self._lower_stale = False

    @property
    def H(self) -> torch.Tensor:
        """``[K, K]`` fp32, the accumulator itself (not a copy), symmetric."""
        if self._lower_stale:  # add_batch fills the upper triangle only: mirror it once, when H is read
            self._H.copy_(torch.triu(self._H) + torch.triu(self._H, 1).T)
            self._lower_stale = False
        return self._H

    @property
    def nsamples(self) -> int:
        """Number of input vectors accumulated so far."""
        return self._nsamples

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate inputs of the layer.

        Args:
            x (Tensor): ``[..., K]`` float; every leading index is one sample (token).

        Raises:
            TypeError: ``x`` is not a float tensor.
            ValueError: last dimension is not ``K``, or ``x`` holds NaN/Inf.
        """
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            got = getattr(x, "dtype", type(x).__name__)
            raise TypeError(f"GPTQHessian.add_batch: expected a float tensor, got {got}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"GPTQHessian.add_batch: inputs of shape {tuple(x.shape)} do not end in "
                             f"in_features={self.in_features}")
        x = x.reshape(-1, self.in_features).to(device=self._H.device, dtype=torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError("GPTQHessian.add_batch: calibration inputs hold NaN/Inf")
        # H ← n/(n+m)·H + 2/(n+m)·XᵀX in fp32, upper triangle only (H is symmetric): one matmul per band of
        # `band` rows, H[i:i+b, i:] from X[:, i:i+b]ᵀ X[:, i:]; about (1 + b/K)/2 of the full product's work.
        n = self._nsamples
        self._nsamples = n + m
        k, b = self.in_features, self.band
        if k <= b:
            self._H.addmm_(x.T, x, beta=n / (n + m), alpha=2.0 / (n + m))
            return
        b = -(-k // -(-k // b))  # equal bands
        for i in range(0, k, b):
            self._H[i:i + b, i:].addmm_(x[:, i:i + b].T, x[:, i:], beta=n / (n + m), alpha=2.0 / (n + m))
        self._lower_stale = True


def _cholesky(h: torch.Tensor, name: str, damp_percent: float, upper: bool = False) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(h, upper=upper)
    if int(info) != 0:
        raise ValueError(f"{name}: the damped Hessian is not positive definite (Cholesky failed at column "
                         f"{int(info) - 1}) with damp_percent={damp_percent}; use a larger damp_percent "
                         "(e.g. 0.1) or more calibration data")
    return factor


def group_aware_order(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """Column order of group-aware reordering (GAR): contiguous groups, most important first.

    Full groups are sorted by their largest Hessian diagonal (descending) and the columns inside each
    group by their own diagonal (descending); a partial last group (``K % group_size`` columns) stays
    last, sorted inside. Sorts are stable, so ties keep the natural order.

    Args:
        diag (Tensor): ``[K]`` diagonal of the Hessian.
        group_size (int): columns per group (> 0).

    Returns:
        Tensor: ``[K]`` int64 permutation ``perm``; position ``i`` quantizes original column ``perm[i]``,
        and positions ``[j·g, (j+1)·g)`` hold exactly one original group.
    """
    k = diag.numel()
    full = k // group_size
    base = torch.arange(k, device=diag.device)
    if full == 0:
        return torch.argsort(diag, descending=True, stable=True)
    blocks = diag[: full * group_size].reshape(full, group_size)
    local = torch.argsort(blocks, dim=1, descending=True, stable=True)
    order = torch.argsort(blocks.amax(1), descending=True, stable=True)
    perm = (local[order] + (order * group_size).unsqueeze(1)).reshape(-1)
    if full * group_size < k:
        tail = base[full * group_size:]
        perm = torch.cat([perm, tail[torch.argsort(diag[tail], descending=True, stable=True)]])
    return perm


def _solve_blocked(Wt: torch.Tensor, Hinv: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   col_group: list[int], cfg: GPTQConfig, scale_dtype: torch.dtype, name: str) -> torch.Tensor:
    """GPTQ's column solve on the transposed weight, in lazy batches of ``cfg.block_size`` columns.

    ``Wt`` is ``W`` transposed, ``[K, N]`` fp32 (already permuted), so that column ``j`` of ``W`` is the
    contiguous row ``Wt[j]``. Inside a batch ``[i1, i2)`` each column is quantized, its scaled error
    ``e_j = (w_j − q_j) / U[j, j]`` is stored, and only the batch's remaining rows receive the update, as
    one BLAS rank-1 update ``Wt[j+1:i2] −= U[j, j+1:i2]ᵀ e_jᵀ`` (``addr_``). The columns after the batch
    receive the whole batch's updates at once, ``Wt[i2:] −= U[i1:i2, i2:]ᵀ E`` (one ``addmm_``). This is
    the same arithmetic as the column-by-column loop up to the rounding of fused multiply-adds and of the
    matmul's summation order (a code can differ by one where ``w/scale`` falls on a rounding tie).

    Args:
        Wt (Tensor): ``[K, N]`` fp32, modified in place.
        Hinv (Tensor): ``[K, K]`` fp32, ``U``, the upper Cholesky factor of ``H⁻¹``.
        scales, zeros (Tensor): ``[G, N]`` fp32; filled here for dynamic groups (read with ``static_groups``).
        col_group (list[int]): ``[K]`` group of each (permuted) column.
        cfg (GPTQConfig): bits, group size, sym, static_groups, block_size.
    Returns:
        Tensor: ``[K, N]`` float32 codes, in the (permuted) column order of ``Wt``.
    """
    k, n = Wt.shape
    bits, maxq = cfg.bits, 2**cfg.bits - 1
    gs = k if cfg.group_size == -1 else cfg.group_size
    bs = cfg.block_size
    codes = torch.empty(k, n, dtype=torch.float32, device=Wt.device)
    err = torch.empty(min(bs, k), n, dtype=torch.float32, device=Wt.device)
    diag = torch.diagonal(Hinv).tolist()
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        E = err[: i2 - i1]
        _solve_batch(Wt, Hinv, scales, zeros, col_group, codes, E, diag, i1, i2, cfg, scale_dtype, name)
        if i2 < k:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, E, alpha=-1)
    return codes


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run a CPU solve on one intra-op thread.

    Most ops of the solve touch one row of ``N`` floats: too little work to share, so a second thread only adds an
    OpenMP barrier per op; on a loaded machine (threads descheduled) those barriers made the column loop 10-50×
    slower, and LAPACK's ``cholesky_inverse`` of a 576×576 Hessian took 0.7 s on two threads against 0.02 s on
    one. The calibration's forwards and Hessians, the large matmuls, keep every thread.
    """
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _solve_batch(Wt: torch.Tensor, Hinv: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, col_group: list[int],
                 codes: torch.Tensor, E: torch.Tensor, diag: list[float], i1: int, i2: int, cfg: GPTQConfig,
                 scale_dtype: torch.dtype, name: str) -> None:
    """Columns ``[i1, i2)`` of :func:`_solve_blocked`: codes into ``codes[i1:i2]``, scaled errors into ``E``."""
    k = Wt.shape[0]
    bits, maxq = cfg.bits, 2**cfg.bits - 1
    gs = k if cfg.group_size == -1 else cfg.group_size
    for j in range(i1, i2):
        if not cfg.static_groups and j % gs == 0:
            # the group's current values: rows of this batch are up to date; rows past the batch have not
            # yet received this batch's lazy update, so it is applied to the slice here
            end = min(j + gs, k)
            cur = Wt[j:min(end, i2)]
            if end > i2:
                rest = torch.addmm(Wt[i2:end], Hinv[i1:j, i2:end].T, E[: j - i1], alpha=-1)
                cur = torch.cat([cur, rest])
            g = col_group[j]
            scales[g], zeros[g] = _group_params(cur.amin(0), cur.amax(0), bits, cfg.sym, scale_dtype, name)
        g = col_group[j]
        s, z = scales[g], zeros[g]
        w = Wt[j]
        q = codes[j]
        torch.div(w, s, out=q)
        q.round_().add_(z).clamp_(0, maxq)
        e = E[j - i1]
        torch.sub(q, z, out=e)
        e.mul_(s)
        torch.sub(w, e, out=e)
        e.div_(diag[j])
        if j + 1 < i2:
            Wt[j + 1:i2].addr_(Hinv[j, j + 1:i2], e, alpha=-1)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | GPTQHessian, cfg: GPTQConfig, name: str = "weight",
                  *, scale_dtype: torch.dtype = torch.float16) -> GPTQTensors:
    """Quantize one linear weight with GPTQ.

    Follows the reference ``fasterquant`` (IST-DASLab/gptq, AutoGPTQ): dead inputs (``H[i,i] = 0``) get
    ``H[i,i] = 1`` and a zero weight column; optional act-order permutation; damping
    ``λ = damp_percent · mean(diag H)``; ``U = chol(H⁻¹)ᵀ``; column-by-column quantization with
    error compensation in lazy blocks. Group parameters are computed when a group starts, on the
    current (already compensated, possibly permuted) columns of the group; with act-order and
    ``static_groups`` (the default) they are computed up front on the original column groups. All float
    work is fp32 on ``weight.device``.

    Args:
        weight (Tensor): ``[N, K]`` float (fp16/bf16/fp32/fp64).
        hessian (Tensor | GPTQHessian): ``[K, K]`` (``2/n·XᵀX``) or its accumulator.
        cfg (GPTQConfig): the settings.
        name (str): layer name for error messages.
        scale_dtype (torch.dtype): dtype of ``scales`` (fp16 like checkpoints).

    Returns:
        GPTQTensors: ``g_idx[perm[i]] = i // group_size`` with act-order and dynamic groups,
        ``k // group_size`` otherwise.

    Raises:
        TypeError: non-float weight, non-tensor hessian or a wrong config type.
        ValueError: NaN/Inf or malformed weight, a hessian that is not ``[K, K]``, holds NaN/Inf or
            has no samples, or a damped Hessian that is not positive definite.
    """
    _check_cfg(cfg, (GPTQConfig,), "gptq_quantize")
    check_weight(weight, name=name)
    n, k = weight.shape
    device = weight.device
    if isinstance(hessian, GPTQHessian):
        if hessian.nsamples == 0:
            raise ValueError(f"{name}: the GPTQHessian has no calibration samples; call add_batch() first")
        hessian = hessian.H
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"{name}: hessian must be a Tensor or GPTQHessian, got {type(hessian).__name__}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"{name}: hessian has shape {tuple(hessian.shape)}, expected [{k}, {k}] for weight "
                         f"of shape {tuple(weight.shape)}")
    with _one_cpu_thread(device):
        return _gptq_solve(weight, hessian, cfg, name, scale_dtype)


def _gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig, name: str,
                scale_dtype: torch.dtype) -> GPTQTensors:
    """:func:`gptq_quantize` once its arguments are checked: ``weight`` ``[N, K]``, ``hessian`` ``[K, K]``."""
    n, k = weight.shape
    device = weight.device
    H = hessian.to(device=device, dtype=torch.float32, copy=True)
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{name}: hessian holds NaN/Inf")
    W = weight.to(dtype=torch.float32, copy=True)

    bits, maxq = cfg.bits, 2**cfg.bits - 1
    gs = k if cfg.group_size == -1 else cfg.group_size
    n_groups = -(-k // gs)

    # An input that is always 0 carries no information; its weight cannot affect the output.
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    # static_groups only applies with act-order, act_group_aware only without it (GPTQConfig.ordering); the
    # column loop reads cfg.static_groups, so it is cleared where it is ignored
    ordering = cfg.ordering
    if cfg.static_groups and ordering != "act-order-static":
        cfg = dataclasses.replace(cfg, static_groups=False)
    scales = torch.empty(n_groups, n, dtype=torch.float32, device=device)
    zeros = torch.empty(n_groups, n, dtype=torch.float32, device=device)
    if cfg.static_groups:
        for g in range(n_groups):
            cols = W[:, g * gs:(g + 1) * gs]
            scales[g], zeros[g] = _group_params(cols.amin(1), cols.amax(1), bits, cfg.sym, scale_dtype, name)

    perm = None
    group_aware = ordering == "group-aware"
    if cfg.desc_act:
        # stable: equal diagonals keep their order, so the result does not depend on the sort backend.
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    elif group_aware:
        perm = group_aware_order(torch.diagonal(H), gs)
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]

    damp = cfg.damp_percent * torch.mean(torch.diagonal(H))
    H.diagonal().add_(damp)
    L = _cholesky(H, name, cfg.damp_percent)
    Hinv = _cholesky(torch.cholesky_inverse(L), name, cfg.damp_percent, upper=True)
    del H, L

    # Group of each (permuted) column: static groups (and group-aware order, whose groups stay whole)
    # follow the original column, dynamic act-order groups follow the order.
    if cfg.static_groups or group_aware:
        col_group = (perm if perm is not None else torch.arange(k, device=device)) // gs
    else:
        col_group = torch.arange(k, device=device) // gs
    col_group = col_group.tolist()

    codes = _solve_blocked(W.T.contiguous(), Hinv, scales, zeros, col_group, cfg, scale_dtype, name)

    g_idx = torch.arange(k, device=device) // gs
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[inverse]
        if not (cfg.static_groups or group_aware):
            # Column perm[i] was quantized i-th, with the parameters of group i // gs.
            g_idx = torch.empty_like(g_idx)
            g_idx[perm] = torch.arange(k, device=device) // gs
    return _pack_result(codes, scales, zeros, g_idx, bits, cfg.group_size, scale_dtype)


def gptq_quantize_from_inputs(weight: torch.Tensor, x: torch.Tensor, cfg: GPTQConfig, name: str = "weight", *,
                              scale_dtype: torch.dtype = torch.float16) -> GPTQTensors:
    """Accumulate the Hessian of inputs ``x`` (``[..., K]`` float) and run :func:`gptq_quantize`."""
    check_weight(weight, name=name)
    hessian = GPTQHessian(weight.shape[1], device=weight.device)
    hessian.add_batch(x)
    return gptq_quantize(weight, hessian, cfg, name, scale_dtype=scale_dtype)
