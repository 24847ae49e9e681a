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
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .base import QuantConfig, check_weight

_TINY = 1e-12  # keeps all-zero rows/groups finite (their codes are 0 and dequantize to 0)


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
    """

    format: ClassVar[str] = "llm_int8"
    bits: ClassVar[int] = 8
    threshold: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.threshold >= 0.0):
            raise ValueError(f"LLMInt8Config.threshold={self.threshold} must be ≥ 0")


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


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8×int8→int32 product ``a @ bᵀ`` for a [M, K], b [N, K].

    Uses ``torch._int_mm`` where the backend accepts the shapes; otherwise an fp64 matmul, which is
    exact for int8 operands up to K = 2³⁷ (|a·b| ≤ 127² per term), so the result is identical.
    """
    m, k = a.shape
    if hasattr(torch, "_int_mm") and m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0:
        try:
            return torch._int_mm(a, b.t())
        except RuntimeError:
            pass  # backend without this shape/device support; the fp64 path below is exact
    return torch.matmul(a.double(), b.double().t()).to(torch.int32)


def int8_mm_dequant(acc: torch.Tensor, sx: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """Scale an int8×int8 product back to floats (bitsandbytes' ``int8_mm_dequant`` arithmetic).

    ``y[m, n] = (acc[m, n] · (sx[m] · scb[n])) · (1/127²) [+ bias[n]]`` in fp32, then cast to ``dtype``.
    The spec of the native CPU kernel (``torch.ops.qtune.int8_mm_dequant``).

    Args:
        acc: int32 [M, N]. sx: fp32 [M] row absmax of the input. scb: [N] row absmax of the weight.
        bias: [N] or None. dtype: output dtype.
    Returns:
        [M, N] ``dtype``.
    """
    y = acc.float() * (sx.float().unsqueeze(-1) * scb.float().unsqueeze(0)) * (1.0 / (127.0 * 127.0))
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def llm_int8_linear(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, threshold: float,
                    bias: torch.Tensor | None = None, *, mm_dequant=int8_mm_dequant) -> torch.Tensor:
    """Reference LLM.int8() forward ``y = x Ŵᵀ + b`` with mixed-precision decomposition.

    Input columns holding any ``|x| ≥ threshold`` are outlier columns: they are zeroed in the int8
    part (and excluded from the row scales ``sx``) and go through a 16-bit matmul with the matching
    dequantized weight columns instead.

    Args:
        x: (..., K) fp16/bf16/fp32. weight: int8 [N, K]. scb: fp32 [N] per-row absmax.
        threshold: outlier threshold on |x| (0 disables). bias: [N] or None.
        mm_dequant: the epilogue, :func:`int8_mm_dequant` or an op with the same contract.
    Returns:
        (..., N) in ``x.dtype``.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    cols = None
    x_in = x2
    if threshold > 0.0:
        lo, hi = torch.aminmax(x2, dim=0)  # one pass; cheaper than materializing |x| >= t
        cols = ((hi >= threshold) | (lo <= -threshold)).nonzero().view(-1)
        if cols.numel():
            x_in = x2.masked_fill(x2.abs() >= threshold, 0)
        else:
            cols = None
    sx = x_in.abs().amax(dim=1).float()
    xq = torch.round(x_in.float() * (127.0 / sx.clamp(min=_TINY)).unsqueeze(-1)).to(torch.int8)
    if cols is not None:
        xq[:, cols] = 0
    y = mm_dequant(int8_matmul(xq, weight), sx, scb, bias, x.dtype)
    if cols is not None:
        sub_w = (weight[:, cols].float() * (scb.float() / 127.0).unsqueeze(-1)).to(x.dtype)
        y = y.addmm(x2[:, cols], sub_w.t())
    return y.view(*x.shape[:-1], weight.shape[0])
