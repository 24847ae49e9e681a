"""8-bit formats: absmax (bitsandbytes layout), zero-point per row/group, and LLM.int8().

Maths.
- **Symmetric absmax** (per row, or per group of ``group_size`` input columns): with ``a`` the
  group's absmax, ``q = round(w · 127/a)`` (int8) and ``ŵ = q · a/127``. Per row this is exactly
  bitsandbytes' 8-bit layout: ``weight`` int8 [N, K] (``CB``) and ``SCB`` = ``a`` fp32 [N].
- **Asymmetric zero-point**: ``s = (max − min)/255``, ``z = round(−min/s)`` clamped to [0, 255],
  ``q = clamp(round(w/s) + z, 0, 255)`` (uint8) and ``ŵ = (q − z) · s``.
- **LLM.int8()** (Dettmers et al. 2022) keeps the symmetric per-row weight and decomposes the matmul
  at run time: input columns ``O = {k : max_m |x[m,k]| ≥ threshold}`` are multiplied in 16 bits with
  the dequantized weight columns; the rest is quantized per activation row (``s_x = max_k |x[m,k]|``)
  to int8 and multiplied int8×int8→int32: ``y = (x̄_q W_qᵀ) · s_x s_wᵀ / 127² + x_O Ŵ_Oᵀ``.
  This mirrors ``bitsandbytes.MatMul8bitLt`` (the threshold acts on activations and is not stored).
- **bitsandbytes' arithmetic** (``LLMInt8Config(arithmetic="bitsandbytes")``, the choice for checkpoints
  that bitsandbytes wrote): the same decomposition computed as bitsandbytes 0.50 computes it, operation
  for operation, so a bitsandbytes checkpoint gives bitsandbytes' eval-mode logits: activations are cast to
  fp16 before the threshold test and the row quantization (``A.to(torch.float16)`` in ``MatMul8bitLt``),
  the epilogue multiplies by bitsandbytes' constant ``6.200124e-05`` (≈ 1/127², 1.8e-5 relative above
  it) and the outlier weight columns are ``CB · SCB · 7.874015718698502e-3``.

The int8×int8→int32 product (:func:`int8_matmul`) is exact on every path; which path is fast depends on
the CPU (:func:`qtune.hardware.int8_matmul_method`): ``torch._int_mm`` where oneDNN has VNNI int8
kernels, otherwise an fp32 matmul over K-chunks of at most 1024, exact because every product of int8
values is an integer of magnitude ≤ 128² = 2¹⁴ and a sum of ≤ 1024 of them stays ≤ 2²⁴, where fp32 holds
every integer exactly (for any summation order); the chunk sums are added in int32.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..hardware import FP32_EXACT_CHUNK, int8_matmul_fp32_chunks  # noqa: F401  (exact fp32 path, re-exported)
from .base import CliOption, QuantConfig, check_weight

_TINY = 1e-12  # keeps all-zero rows/groups finite (their codes are 0 and dequantize to 0)
ARITHMETICS = ("qtune", "bitsandbytes")
BNB_MM_DEQUANT_SCALE = 6.200124e-05       # bitsandbytes' int8_mm_dequant constant (its 1/127²)
BNB_DEQUANT_SCALE = 7.874015718698502e-3  # bitsandbytes' int8_vectorwise_dequant constant (1/127)


@dataclasses.dataclass(frozen=True)
class Int8Config(QuantConfig):
    """8-bit round-to-nearest weights.

    Attributes:
        symmetric: absmax scaling (int8 codes) if True, zero-point (uint8 codes) if False.
        group_size: input columns per scale; -1 = one scale per output row (bitsandbytes' layout
            when symmetric). A group size that does not divide ``in_features`` leaves a partial last group.
    """

    format: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8
    op_family: ClassVar[str] = "int8"
    symmetric: bool = True
    group_size: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size != -1 and self.group_size < 2:
            raise ValueError(f"Int8Config.group_size={self.group_size} must be -1 (per row) or ≥ 2")


@dataclasses.dataclass(frozen=True)
class LLMInt8Config(QuantConfig):
    """LLM.int8(): per-row int8 weights + fp16 outlier columns chosen at run time.

    Attributes:
        threshold: activation magnitude at or above which an input column is an outlier (default 6.0;
            0 disables the decomposition, leaving plain vector-wise int8×int8).
        arithmetic: ``"qtune"`` (activations quantized in fp32, epilogue ``1/127²``) or
            ``"bitsandbytes"`` (bitsandbytes 0.50's operations, fp16 activation casts included; see the
            module docstring). Same weights either way; the outputs differ by the activations' fp16 rounding.
    """

    format: ClassVar[str] = "llm_int8"
    bits: ClassVar[int] = 8
    cli_options: ClassVar[tuple[CliOption, ...]] = (
        CliOption("threshold", "LLM.int8 outlier threshold (default 6.0)", type=float),
    )
    threshold: float = 6.0
    arithmetic: str = "qtune"

    @property
    def op_family(self) -> str:  # type: ignore[override]
        """``llm_int8``, or ``llm_int8_bnb`` for bitsandbytes' arithmetic (checkpoints bitsandbytes wrote)."""
        return "llm_int8_bnb" if self.arithmetic == "bitsandbytes" else "llm_int8"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.threshold >= 0.0):
            raise ValueError(f"LLMInt8Config.threshold={self.threshold} must be ≥ 0")
        if self.arithmetic not in ARITHMETICS:
            raise ValueError(f"LLMInt8Config.arithmetic={self.arithmetic!r} is not one of {ARITHMETICS}")


@dataclasses.dataclass
class Int8Tensors:
    """``weight``: int8 (symmetric) or uint8 (zero-point) [N, K]; ``scale``: fp32 [N, G] — the absmax
    ``a`` when symmetric (so ``scale[:, 0]`` is bitsandbytes' ``SCB``), the step ``s`` otherwise;
    ``zero``: uint8 [N, G] or None."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int


def _groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """View [N, K] as [N, G, g] (zero-padding a partial last group)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    pad = (-k) % g
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(n, -1, g), pad


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 with bitsandbytes' ``int8_vectorwise_quant`` arithmetic, byte for byte.

    ``a_r = max_k |w[r, k]|``, ``q[r, k] = round_half_even(w[r, k] · (127 / max(a_r, 1e-12)))`` in fp32.
    The spec of the native CPU kernel (``torch.ops.qtune.quantize_int8_rows``).

    Args:
        weight: finite float [N, K].
    Returns:
        (int8 [N, K] codes, fp32 [N] absmax).
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    q = torch.round(w * (127.0 / absmax.clamp(min=_TINY)).unsqueeze(-1)).to(torch.int8)
    return q, absmax


def quantize_int8(weight: torch.Tensor, config: Int8Config | LLMInt8Config, *, name: str = "weight",
                  rows_fn=quantize_int8_rows) -> Int8Tensors:
    """Reference 8-bit quantization.

    Args:
        weight: [N, K] float (any float dtype; arithmetic in fp32).
        config: :class:`Int8Config` or :class:`LLMInt8Config` (symmetric per row).
        name: the layer's name, used in error messages.
        rows_fn: the symmetric per-row kernel, :func:`quantize_int8_rows` or an op with the same contract
            (``torch.ops.qtune.quantize_int8_rows`` dispatches to the native CPU kernel).
    Returns:
        :class:`Int8Tensors`.
    """
    check_weight(weight, name=name)
    symmetric = getattr(config, "symmetric", True)
    group_size = getattr(config, "group_size", -1)
    n, k = weight.shape
    if symmetric and group_size == -1:
        q, absmax = rows_fn(weight)
        return Int8Tensors(q, absmax.unsqueeze(1), None, -1)
    w = weight.detach().float()
    wg, pad = _groups(w, group_size)
    if symmetric:
        absmax = wg.abs().amax(dim=-1, keepdim=True)
        q = torch.round(wg * (127.0 / absmax.clamp(min=_TINY))).to(torch.int8)
        return Int8Tensors(q.view(n, -1)[:, :k].contiguous(), absmax.squeeze(-1), None, group_size)
    lo = wg.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = wg.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255.0).clamp(min=_TINY)
    zero = torch.round(-lo / scale).clamp(0, 255)
    q = torch.clamp(torch.round(wg / scale) + zero, 0, 255).to(torch.uint8)
    return Int8Tensors(q.view(n, -1)[:, :k].contiguous(), scale.squeeze(-1), zero.squeeze(-1).to(torch.uint8), group_size)


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference 8-bit dequantization: ``q·a/127`` (symmetric) or ``(q − z)·s`` (zero-point).

    Args:
        weight: int8/uint8 [N, K]. scale: fp32 [N, G]. zero: uint8 [N, G] or None.
        group_size: -1 or the group width. dtype: output dtype (computed in fp32, then cast).
    Returns:
        [N, K] ``dtype``.
    """
    n, k = weight.shape
    q = weight.float()
    if zero is None:
        step = scale.float() / 127.0
        if group_size == -1:
            return (q * step).to(dtype)
    elif group_size == -1:
        return ((q - zero.float()) * scale.float()).to(dtype)
    g = group_size
    idx = torch.arange(k, device=weight.device) // g
    if zero is None:
        return (q * step[:, idx]).to(dtype)
    return ((q - zero.float()[:, idx]) * scale.float()[:, idx]).to(dtype)


def int8_matmul(a: torch.Tensor, b: torch.Tensor, *, method: str | None = None) -> torch.Tensor:
    """Exact int8×int8→int32 product ``a @ bᵀ`` for a [M, K], b [N, K] (int8).

    Args:
        method: ``"int_mm"`` (``torch._int_mm``), ``"fp32"`` (:func:`int8_matmul_fp32_chunks`), or None:
            the fast exact one on ``a``'s device, :func:`qtune.hardware.int8_matmul_method`. Shapes
            ``torch._int_mm`` rejects (M ≤ 16, K or N not a multiple of 8) take the fp32 path.
    Returns:
        int32 [M, N], equal on every path.
    """
    if method is None:
        from .. import hardware
        method = hardware.int8_matmul_method(a.device)[0]
    if method not in ("int_mm", "fp32"):
        raise ValueError(f"int8_matmul: method={method!r} is not one of 'int_mm', 'fp32'")
    m, k = a.shape
    if method == "int_mm" and m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0:
        return torch._int_mm(a, b.t())
    return int8_matmul_fp32_chunks(a, b)


def int8_mm_dequant(acc: torch.Tensor, sx: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype, scale: float = 1.0 / (127.0 * 127.0)) -> torch.Tensor:
    """Scale an int8×int8 product back to floats (bitsandbytes' ``int8_mm_dequant`` arithmetic).

    ``y[m, n] = (acc[m, n] · (sx[m] · scb[n])) · scale [+ bias[n]]`` in fp32, then cast to ``dtype``.
    The spec of the native CPU kernel (``torch.ops.qtune.int8_mm_dequant``).

    Args:
        acc: int32 [M, N]. sx: fp32 [M] row absmax of the input. scb: [N] row absmax of the weight.
        bias: [N] or None. dtype: output dtype.
        scale: ``1/127²`` (qtune) or :data:`BNB_MM_DEQUANT_SCALE` (bitsandbytes), applied as an fp32 scalar.
    Returns:
        [M, N] ``dtype``.
    """
    y = acc.float() * (sx.float().unsqueeze(-1) * scb.float().unsqueeze(0)) * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def llm_int8_linear(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, threshold: float,
                    bias: torch.Tensor | None = None, *, mm_dequant=int8_mm_dequant,
                    arithmetic: str = "qtune") -> torch.Tensor:
    """Reference LLM.int8() forward ``y = x Ŵᵀ + b`` with mixed-precision decomposition.

    Input columns holding any ``|x| ≥ threshold`` are outlier columns: they are zeroed in the int8
    part (and excluded from the row scales ``sx``) and go through a 16-bit matmul with the matching
    dequantized weight columns instead.

    With ``arithmetic="bitsandbytes"`` every step is bitsandbytes 0.50's (``MatMul8bitLt.forward`` →
    ``int8_vectorwise_quant`` → ``int8_mixed_scaled_mm``/``int8_scaled_mm`` → ``int8_mm_dequant``):
    ``x16 = x.to(fp16)``; outliers are ``|x16| ≥ threshold``, zeroed in ``x16``; ``sx = max|x16|`` per
    row; ``x_q = round(x16 · (127/sx))`` in fp32 with outlier columns zeroed; ``y = (x_q W_qᵀ) · (sx s_wᵀ)
    · 6.200124e-05 + b`` in fp32, cast to ``x.dtype``; then ``y += x_O (W_q,O · s_w · 7.874015718698502e-3)ᵀ``
    with ``x_O`` taken from the original ``x`` (not its fp16 cast). The int32 product is exact (bitsandbytes'
    ``torch._int_mm`` path), whichever :func:`int8_matmul` path computes it.

    Args:
        x: (..., K) fp16/bf16/fp32. weight: int8 [N, K]. scb: fp32 [N] per-row absmax.
        threshold: outlier threshold on |x| (0 disables). bias: [N] or None.
        mm_dequant: the epilogue, :func:`int8_mm_dequant` or an op with the same contract.
        arithmetic: ``"qtune"`` or ``"bitsandbytes"`` (see :class:`LLMInt8Config`).
    Returns:
        (..., N) in ``x.dtype``.
    """
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"llm_int8_linear: arithmetic={arithmetic!r} is not one of {ARITHMETICS}")
    bnb = arithmetic == "bitsandbytes"
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    x_q_src = x2.to(torch.float16) if bnb else x2  # bitsandbytes quantizes the fp16 cast of A
    cols = None
    x_in = x_q_src
    if threshold > 0.0:
        lo, hi = torch.aminmax(x_q_src, dim=0)  # one pass; cheaper than materializing |x| >= t
        cols = ((hi >= threshold) | (lo <= -threshold)).nonzero().view(-1)
        if cols.numel():
            x_in = x_q_src.masked_fill(x_q_src.abs() >= threshold, 0)
        else:
            cols = None
    sx = x_in.abs().amax(dim=1).float()
    xq = torch.round(x_in.float() * (127.0 / sx.clamp(min=_TINY)).unsqueeze(-1)).to(torch.int8)
    if cols is not None:
        xq[:, cols] = 0
    acc = int8_matmul(xq, weight)
    if bnb:
        y = mm_dequant(acc, sx, scb, bias, x.dtype, BNB_MM_DEQUANT_SCALE)
    else:
        y = mm_dequant(acc, sx, scb, bias, x.dtype)
    if cols is not None:
        if bnb:
            sub_w = (weight[:, cols] * scb.float().view(-1, 1) * BNB_DEQUANT_SCALE).to(x.dtype)
        else:
            sub_w = (weight[:, cols].float() * (scb.float() / 127.0).unsqueeze(-1)).to(x.dtype)
        y = y.addmm(x2[:, cols], sub_w.t())
    return y.view(*x.shape[:-1], weight.shape[0])
