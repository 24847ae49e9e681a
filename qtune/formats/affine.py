r"""``affine``: unsigned b-bit codes with a float scale *and a float offset* per group, fitted without calibration.

This module is the reference (the specification) of the format: config, packing, the fitting quantizer and the
dequantization every faster kernel must reproduce.

Maths, for a weight ``W`` [N, K] (``N = out_features``, ``K = in_features``), ``b`` bits, group size ``g`` along
the input dimension and ``G = ceil(K / g)`` groups per row (the last one may be partial)::

    W[n, k] ≈ s[n, j] · q[n, k] + m[n, j],     j = k // g,   q ∈ {0, …, 2^b − 1}

with ``s`` (scale) and ``m`` (offset) fp16 and the arithmetic in fp32: two roundings, ``fl(fl(s·q) + m)``, no
fused multiply-add. Unlike GPTQ's integer zero point, ``m`` is any float, so a change of the weights that is
constant within a group (a quantization-aware LoRA update, Xu et al. 2023) can be added to ``m`` exactly: the
same ``q`` and ``s`` then describe the updated weights (see ``LinearAffine.add_to_offsets_``). This is GGUF's
Q4_1/Q5_1 (``w = d·q + m``) generalised to 2/3/4/8 bits and groups of 32–128.

Storage (tensors 2-D by output row, so row sharding keeps each row's groups together):

* ``weight``: uint8 ``[N, ceil(K/8) · b]``. Each row is a little-endian bit stream: code ``k`` occupies stream
  bits ``[b·k, b·k + b)``, i.e. byte ``(b·k) // 8`` from bit ``(b·k) % 8`` upward, spilling into the next byte for
  3-bit codes that straddle a byte boundary. 4-bit: byte ``i = q[2i] | q[2i+1] << 4``. Columns past ``K`` (K not a
  multiple of 8) hold zero codes.
* ``scale``, ``offset``: fp16 ``[N, G]``.

Quantization (no calibration data): the group's offset (and optionally its scale) is fitted to its weights by
the half-quadratic scheme of HQQ (Badri & Shaji 2023):

1. start from the min-max step with 0 on the grid: ``s = (max − min) / (2^b − 1)``, ``m = −s · round(−min / s)``
   (the offset moves by at most half a step from ``min``, as asymmetric RTN's integer zero point does). A grid
   that starts at ``min`` has a lower squared error, even weighted by the layer inputs' second moments, yet
   measured far worse on SmolLM2-135M (affine-4 g64 48.7 against 46.4 for RTN-4 g128 asym; affine-3 g64 176);
   with 0 on the grid the bulk of the weights, those near 0, keep their value;
2. ``iters`` times: round ``q = clamp(round((w − m) / s), 0, 2^b − 1)``; take the residual's sparse part
   ``e = shrink_p(w − (s·q + m), β)`` (the proximal step of the ``|·|^p`` penalty, ``p < 1``, which lets a few
   outliers keep large errors); then, with ``fit="offset"`` (HQQ's own scheme, the default), ``m ← mean(w − e −
   s·q)`` over the group with ``s`` kept, in the weights' units, each group stopping at its first iterate that does
   not lower its squared error; with ``fit="scale_offset"``, ``(s, m)`` ← least squares of ``s·q + m`` to
   ``w − e`` (closed form per group; the residual shrunk in units of the min-max step), all ``iters`` run;
   ``β ← κ·β``;
3. keep, per group, the ``(s, m)`` whose rounding gave the smallest squared error ``Σ (w − s·q − m)²``, round them
   to fp16 and keep them only where, with the stored fp16 values, they still beat the fp16 start (so the fit never
   ends worse than its start), and choose the codes with the stored values.

``shrink_p(x, β) = sign(x) · max(|x| − |x|^(p−1) / β, 0)`` (HQQ's generalised soft threshold).
``iters = 0`` is plain min-max rounding on that grid (RTN).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from .base import CliOption, QuantConfig, check_weight

__all__ = ["AffineConfig", "AffineTensors", "pack_codes", "unpack_codes", "fit_affine", "quantize_affine",
           "dequantize_affine", "packed_width", "n_groups", "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES"]

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
_FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): a stored scale is never 0

# fitting constants (HQQ's defaults for p and the β schedule)
LP_NORM = 0.7
BETA0 = 10.0
KAPPA = 1.01
FITS = ("offset", "scale_offset")


def _aliases() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for b in SUPPORTED_BITS:
        out[f"affine{b}"] = {"bits": b}
        for g in SUPPORTED_GROUP_SIZES:
            out[f"affine{b}_g{g}"] = {"bits": b, "group_size": g}
    return out


@dataclasses.dataclass(frozen=True)
class AffineConfig(QuantConfig):
    """Float-offset group quantization: ``W ≈ s·q + m`` per group, fp16 ``s`` and ``m`` (see the module docstring).

    Attributes:
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns per (scale, offset) pair: 32, 64 or 128 (a partial last group is allowed).
        iters: fitting iterations of the quantizer (0: plain min-max rounding). Not needed to read the layer.
        fit: what the iterations refit: ``"offset"`` (HQQ's scheme: the min-max scale stays, default) or
            ``"scale_offset"`` (both, by least squares). Not needed to read the layer.
    """

    format: ClassVar[str] = "affine"
    op_family: ClassVar[str] = "affine"
    float_offset: ClassVar[bool] = True
    cli_options: ClassVar[tuple[CliOption, ...]] = (
        CliOption("bits", "code width (default 4)", choices=SUPPORTED_BITS),
        CliOption("group_size", "affine: input columns per scale and offset, 32/64/128 (default 64)"),
        CliOption("iters", "affine: scale/offset fitting iterations, 0 = min-max rounding (default 20)"),
        CliOption("fit", "affine: what the iterations refit, offset (HQQ, default) or scale_offset", type=str,
                  choices=FITS),
    )
    spec_aliases: ClassVar[Mapping[str, Mapping[str, Any]]] = _aliases()
    bits: int = 4
    group_size: int = 64
    iters: int = 20
    fit: str = "offset"

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"{cls}.bits={self.bits!r} is not supported; choose one of {SUPPORTED_BITS}")
        if isinstance(self.group_size, bool) or self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"{cls}.group_size={self.group_size!r} is not supported; choose one of "
                             f"{SUPPORTED_GROUP_SIZES}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or not (0 <= self.iters <= 1000):
            raise ValueError(f"{cls}.iters={self.iters!r} must be an integer in [0, 1000]")
        if self.fit not in FITS:
            raise ValueError(f"{cls}.fit={self.fit!r} is not supported; choose one of {FITS}")


@dataclasses.dataclass
class AffineTensors:
    """The stored tensors: ``weight`` uint8 [N, ceil(K/8)·bits], ``scale`` and ``offset`` fp16 [N, G]."""

    weight: Tensor
    scale: Tensor
    offset: Tensor


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per packed row: ``ceil(K / 8) · bits``."""
    return math.ceil(in_features / 8) * bits


def n_groups(in_features: int, group_size: int) -> int:
    """Groups per row, ``ceil(K / g)``."""
    return math.ceil(in_features / group_size)


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------
def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack codes row by row into the little-endian bit stream of the module docstring.

    Args:
        codes: integer [N, K], values in [0, 2^bits − 1].
        bits: 2, 3, 4 or 8.
    Returns:
        uint8 [N, ceil(K/8)·bits].
    """
    n, k = codes.shape
    pad = (-k) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(n, -1, 8)  # 8 codes = `bits` bytes
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)                                                  # [N, K/8], < 2^(8·bits)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).view(n, -1)


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 [N, ceil(K/8)·bits] → int64 codes [N, K]."""
    n = packed.shape[0]
    b = packed.to(torch.int64).view(n, -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1)                                             # [N, K/8]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.view(n, -1)[:, :in_features]


# --------------------------------------------------------------------------------------------------
# Dequantization (the spec)
# --------------------------------------------------------------------------------------------------
def dequantize_affine(weight: Tensor, scale: Tensor, offset: Tensor, bits: int, group_size: int,
                      in_features: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference dequantization ``Ŵ[n, k] = fl(fl(s[n, k//g] · q[n, k]) + m[n, k//g])`` in fp32, then cast.

    Args:
        weight: uint8 [N, ceil(K/8)·bits]. scale, offset: [N, G] (fp16 in layers; any float dtype).
        bits, group_size, in_features: the layer's static metadata.
        dtype: output dtype.
    Returns:
        [N, K] ``dtype``.
    """
    q = unpack_codes(weight, bits, in_features).float()
    idx = torch.arange(in_features, device=weight.device) // group_size
    s = scale.float()[:, idx]
    m = offset.float()[:, idx]
    return (s * q + m).to(dtype)


# --------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------
def _grouped(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """[N, K] → ([N, G, g] zero-padded, validity mask [1, G, g] as fp32)."""
    n, k = w.shape
    pad = (-k) % group_size
    valid = torch.ones(1, k, device=w.device)
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad))
    return w.view(n, -1, group_size), valid.view(1, -1, group_size)


def _shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """HQQ's generalised soft threshold ``sign(x) · max(|x| − |x|^(p−1)/β, 0)`` (proximal step of ``|x|^p``)."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-12).pow(p - 1) / beta)


def _start_grid(w: Tensor, valid: Tensor, maxq: float) -> tuple[Tensor, Tensor, Tensor]:
    """Each group's starting grid: ``(scale, offset, flat)``, [N, G, 1] each.

    ``s = (max − min) / maxq`` and ``m = −s · round(−min / s)``: the min-max step, with the offset moved (by at most
    half a step) so that 0 is a grid point (code ``round(−min/s)``), as in asymmetric RTN's integer zero point.
    A constant group (``flat``) gets ``s = 1``, ``m =`` its value (codes 0: exact).
    """
    big = torch.finfo(torch.float32).max
    lo = torch.where(valid > 0, w, big).amin(-1, keepdim=True)
    hi = torch.where(valid > 0, w, -big).amax(-1, keepdim=True)
    step = (hi - lo) / maxq
    flat = step <= 0
    scale = torch.where(flat, torch.ones_like(step), step)
    offset = torch.where(flat, lo, -scale * torch.round(-lo / scale))
    return scale, offset, flat


def _codes_and_error(w: Tensor, valid: Tensor, s: Tensor, m: Tensor, maxq: float) -> tuple[Tensor, Tensor]:
    """Codes ``clamp(round((w − m)/s), 0, maxq)`` [N, G, g] and each group's squared error ``Σ (w − s·q − m)²``
    over its valid entries, [N, G, 1]."""
    q = torch.clamp(torch.round((w - m) / s), 0, maxq)
    r = (w - (s * q + m)) * valid
    return q, (r * r).sum(-1, keepdim=True)


def fit_affine(w: Tensor, valid: Tensor, bits: int, iters: int, fit: str = "offset") -> tuple[Tensor, Tensor]:
    """Fit each group's scale and offset (fp32, before fp16 rounding); see the module docstring.

    Args:
        w: fp32 [N, G, g] weights (padding anywhere ``valid`` is 0).
        valid: fp32 [1, G, g], 1 for real weights, 0 for padding.
        bits: code width.
        iters: alternating iterations (0: min-max).
        fit: ``"offset"`` (HQQ: the min-max scale is kept, only the offset moves) or ``"scale_offset"`` (both
            refitted by least squares each iteration).
    Returns:
        (scale, offset) fp32 [N, G, 1] each; scale > 0. Per group, the iterate with the smallest squared error
        (the start included).
    """
    if fit not in FITS:
        raise ValueError(f"fit_affine: fit={fit!r} is not one of {FITS}")
    maxq = float(2**bits - 1)
    scale, offset, flat = _start_grid(w, valid, maxq)
    q, best_err = _codes_and_error(w, valid, scale, offset, maxq)
    if fit == "offset":
        return scale, _fit_offset(w, valid, scale, offset, ~flat, best_err, maxq, iters)
    unit = scale  # residuals are shrunk in units of the min-max step
    n_valid = valid.sum(-1, keepdim=True)
    best_s, best_m = scale, offset
    beta = BETA0
    for _ in range(iters):
        resid = (w - (scale * q + offset)) / unit
        target = w - _shrink_lp(resid, beta, LP_NORM) * unit
        # least squares of s·q + m to `target` over the group's valid entries (closed form)
        qv = q * valid
        sq, sqq = qv.sum(-1, keepdim=True), (qv * q).sum(-1, keepdim=True)
        st, sqt = (target * valid).sum(-1, keepdim=True), (qv * target).sum(-1, keepdim=True)
        det = n_valid * sqq - sq * sq
        ok = (det > 0) & ~flat
        new_s = (n_valid * sqt - sq * st) / torch.where(ok, det, torch.ones_like(det))
        ok = ok & (new_s > 0)
        scale = torch.where(ok, new_s, scale)
        offset = torch.where(ok, (st - scale * sq) / n_valid, offset)
        q, err = _codes_and_error(w, valid, scale, offset, maxq)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, scale, best_s)
        best_m = torch.where(better, offset, best_m)
        beta *= KAPPA
    return best_s, best_m


def _fit_offset(w: Tensor, valid: Tensor, scale: Tensor, offset: Tensor, live: Tensor, err: Tensor, maxq: float,
                iters: int) -> Tensor:
    """HQQ's offset iterations (module docstring, step 2 with ``fit="offset"``) on the groups still improving.

    Args:
        w: fp32 [N, G, g]. valid: fp32 [1, G, g]. scale, offset: fp32 [N, G, 1], the start.
        live: bool [N, G, 1], the groups to fit. err: fp32 [N, G, 1], the start's squared error.
    Returns:
        offset fp32 [N, G, 1]: per group the best iterate (the start where none beats it). Each iteration works
        only on the groups whose previous iterate lowered their error (a group stops at its first that does not).
    """
    g = w.shape[-1]
    wf, vf = w.reshape(-1, g), valid.expand_as(w).reshape(-1, g)
    s, m, best = scale.reshape(-1, 1), offset.reshape(-1, 1).clone(), err.reshape(-1, 1).clone()
    n_valid = vf.sum(-1, keepdim=True)
    idx = live.reshape(-1).nonzero().squeeze(1)
    beta = BETA0
    for _ in range(iters):
        if idx.numel() == 0:
            break
        wi, vi, si, mi = wf[idx], vf[idx], s[idx], m[idx]
        qi = torch.clamp(torch.round((wi - mi) / si), 0, maxq)
        e = _shrink_lp(wi - (si * qi + mi), beta, LP_NORM)  # in the weights' units, as HQQ
        new_m = ((wi - e - si * qi) * vi).sum(-1, keepdim=True) / n_valid[idx]
        _, new_err = _codes_and_error(wi, vi, si, new_m, maxq)
        better = (new_err < best[idx]).squeeze(1)
        idx, new_m, new_err = idx[better], new_m[better], new_err[better]
        m[idx], best[idx] = new_m, new_err
        beta *= KAPPA
    return m.view_as(offset)


def quantize_affine(weight: Tensor, config: AffineConfig, *, name: str = "weight") -> AffineTensors:
    """Quantize a float weight [N, K] into :class:`AffineTensors` (see the module docstring).

    The codes are chosen with the fp16-rounded scale and offset that are stored, so dequantization reproduces
    exactly the grid the quantizer assumed; per group, the fitted values are kept only if their squared error (with
    the stored values) is below the starting grid's, so the fit never ends worse than its start.

    Args:
        weight: float [N, K] (arithmetic in fp32).
        config: :class:`AffineConfig`.
        name: the layer's name, for error messages.
    Raises:
        TypeError/ValueError: non-float, non-2-D or non-finite weight; a scale or offset that overflows fp16.
    """
    check_weight(weight, name=name)
    n, k = weight.shape
    w, valid = _grouped(weight.detach().float(), config.group_size)
    maxq = float(2**config.bits - 1)

    def stored(s: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        s16, m16 = s.clamp_min(_FP16_TINY).to(torch.float16), m.to(torch.float16)
        if not (torch.isfinite(s16).all() and torch.isfinite(m16).all()):
            raise ValueError(f"{name}: weights of magnitude up to {weight.abs().max().item():.4g} overflow the fp16 "
                             "scale/offset of the affine format")
        return s16, m16

    s16, m16 = stored(*fit_affine(w, valid, config.bits, config.iters, config.fit))
    q, err = _codes_and_error(w, valid, s16.float(), m16.float(), maxq)
    if config.iters:  # the fit is kept only where, with the stored fp16 values, it beats its start
        s0, m0 = stored(*_start_grid(w, valid, maxq)[:2])
        q0, err0 = _codes_and_error(w, valid, s0.float(), m0.float(), maxq)
        start = err0 <= err
        s16, m16, q = torch.where(start, s0, s16), torch.where(start, m0, m16), torch.where(start, q0, q)
    q = q.to(torch.int64).view(n, -1)[:, :k]
    return AffineTensors(pack_codes(q, config.bits), s16.view(n, -1), m16.view(n, -1))
