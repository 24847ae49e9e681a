"""The format-specific ``QuantLinear`` layers.

Buffer names follow the checkpoint layouts they come from: ``weight``/``SCB`` (bitsandbytes 8-bit),
``qweight``/``qzeros``/``scales``/``g_idx`` (GPTQ); the 4-bit layer keeps bitsandbytes'
``weight.absmax``-style tensors as ``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``,
``nested_offset``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..formats import affine, gguf, gptq, int8, nf4
from ..formats.affine import AffineConfig
from ..formats.gguf import GGUF_CONFIGS, GGUFConfig
from ..formats.gptq import GPTQConfig, GPTQHessian, RTNConfig
from ..formats.int8 import Int8Config, LLMInt8Config
from ..formats.nf4 import FP4Config, NF4Config
from .base import QuantLinear, register_layer


@register_layer(NF4Config, FP4Config)
class Linear4bit(QuantLinear):
    """NF4/FP4 blockwise-absmax layer (see :mod:`qtune.formats.nf4`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: NF4Config | FP4Config, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias, config, **kw)
        device = kw.get("device")
        shape = (self.out_features, self.in_features)
        nb = nf4.n_blocks(shape, config.blocksize)
        self.blocksize = config.blocksize
        self.quant_type = config.quant_type
        self.register_buffer("weight", torch.zeros(nf4.packed_layout(shape, config.blocksize), dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(nb, dtype=torch.uint8 if config.double_quant else torch.float32, device=device))
        self.register_buffer("quant_map", nf4.code_table(config.quant_type, device or "cpu"))
        if config.double_quant:
            self.register_buffer("nested_absmax", torch.zeros(math.ceil(nb / nf4.NESTED_BLOCKSIZE), dtype=torch.float32, device=device))
            self.register_buffer("nested_quant_map", nf4.dynamic_map(device or "cpu"))
            self.register_buffer("nested_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            for name in ("nested_absmax", "nested_quant_map", "nested_offset"):
                self.register_buffer(name, None)

    def quantize_(self, weight: Tensor, *, name: str = "", **kwargs: Any) -> None:
        config: NF4Config | FP4Config = self.config
        name = name or type(self).__name__
        _no_extras(kwargs, name)
        t = nf4.quantize_4bit(weight, config, name=name, blocks_fn=torch.ops.qtune.quantize_blocks_4bit)
        self.weight, self.absmax, self.quant_map = t.packed, t.absmax, t.code
        if t.double_quant:
            self.nested_absmax, self.nested_quant_map, self.nested_offset = t.nested_absmax, t.nested_code, t.nested_offset

    def weight_args(self) -> tuple:
        return (self.packed(), self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map,
                self.nested_offset, self.blocksize, [self.out_features, self.in_features])

    @property
    def quant_group_size(self) -> int | None:
        # blocks run over the flattened [out, in] weight: they follow rows only when a row holds whole blocks
        return self.blocksize if self.in_features % self.blocksize == 0 else None


@register_layer(Int8Config)
class LinearInt8(QuantLinear):
    """8-bit absmax (int8) or zero-point (uint8) layer, per row or per group (see :mod:`qtune.formats.int8`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: Int8Config, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias, config, **kw)
        device = kw.get("device")
        self.group_size = config.group_size
        groups = 1 if config.group_size == -1 else math.ceil(self.in_features / config.group_size)
        code_dtype = torch.int8 if config.symmetric else torch.uint8
        self.register_buffer("weight", torch.zeros(self.out_features, self.in_features, dtype=code_dtype, device=device))
        self.register_buffer("scale", torch.ones(self.out_features, groups, dtype=torch.float32, device=device))
        if config.symmetric:
            self.register_buffer("zero", None)
        else:
            self.register_buffer("zero", torch.zeros(self.out_features, groups, dtype=torch.uint8, device=device))

    def quantize_(self, weight: Tensor, *, name: str = "", **kwargs: Any) -> None:
        config: Int8Config = self.config
        name = name or type(self).__name__
        _no_extras(kwargs, name)
        t = int8.quantize_int8(weight, config, name=name, rows_fn=torch.ops.qtune.quantize_int8_rows)
        self.weight, self.scale, self.zero = t.weight, t.scale, t.zero

    def weight_args(self) -> tuple:
        return (self.packed(), self.scale, self.zero, self.group_size)

    @property
    def quant_group_size(self) -> int | None:
        g = self.group_size
        return g if g != -1 and self.in_features % g == 0 else None


@register_layer(LLMInt8Config)
class LinearLLMInt8(QuantLinear):
    """LLM.int8(): int8 per-row weights (bitsandbytes' ``weight``/``SCB``), fp16 outlier columns at run time."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: LLMInt8Config, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias, config, **kw)
        device = kw.get("device")
        self.threshold = float(config.threshold)
        self.register_buffer("weight", torch.zeros(self.out_features, self.in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.ones(self.out_features, dtype=torch.float32, device=device))

    def quantize_(self, weight: Tensor, *, name: str = "", **kwargs: Any) -> None:
        config: LLMInt8Config = self.config
        name = name or type(self).__name__
        _no_extras(kwargs, name)
        t = int8.quantize_int8(weight, config, name=name, rows_fn=torch.ops.qtune.quantize_int8_rows)
        self.weight, self.SCB = t.weight, t.scale[:, 0].contiguous()

    def weight_args(self) -> tuple:
        return (self.packed(), self.SCB, self.threshold)


@register_layer(GPTQConfig, RTNConfig)
class LinearGPTQ(QuantLinear):
    """GPTQ-layout int-N layer (GPTQ with calibration, or round-to-nearest), see :mod:`qtune.formats.gptq`."""

    packed_name = "qweight"

    def __init__(self, in_features: int, out_features: int, bias: bool, config: GPTQConfig | RTNConfig, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias, config, **kw)
        device = kw.get("device")
        self.bits = config.bits
        self.group_size = config.group_size
        k, n, b = self.in_features, self.out_features, config.bits
        groups = 1 if config.group_size == -1 else math.ceil(k / config.group_size)
        self.register_buffer("qweight", torch.zeros(math.ceil(k / 32) * b, n, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, math.ceil(n / 32) * b, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(groups, n, dtype=torch.float16, device=device))
        g = config.group_size if config.group_size != -1 else k
        self.register_buffer("g_idx", (torch.arange(k, device=device) // g).to(torch.int32))

    def quantize_(self, weight: Tensor, *, name: str = "", hessian: Tensor | GPTQHessian | None = None,
                  **kwargs: Any) -> None:
        config = self.config
        name = name or type(self).__name__
        _no_extras(kwargs, name)
        if isinstance(config, GPTQConfig):
            if hessian is None:
                raise ValueError(f"{name}: GPTQ needs calibration data: pass hessian= (qtune.formats.gptq.GPTQHessian) "
                                 "or quantize the model with calibration inputs; use RTNConfig for round-to-nearest")
            t = gptq.gptq_quantize(weight, hessian, config, name=name)
        else:
            t = gptq.quantize_rtn(weight, config, name=name)
        self.qweight, self.qzeros, self.scales, self.g_idx = t.qweight, t.qzeros, t.scales, t.g_idx

    def requantize_(self, weight: Tensor, *, name: str = "") -> int:
        """Re-round ``weight`` [N, K] onto the layer's own grid (scales, zeros and ``g_idx`` kept: GPTQ cannot
        re-fit them without its Hessian). Returns the number of codes clamped to ``[0, 2^bits − 1]``."""
        self._check_dense_shape(weight, name)
        bits, n = self.bits, self.out_features
        maxq = 2**bits - 1
        g = self.g_idx.long()
        scales = self.scales.float()[g]                             # [K, N]
        zeros = gptq.unpack_zeros(self.qzeros, bits, n)[g].float()  # [K, N]
        codes = torch.round(weight.float().T / scales) + zeros
        clamped = int(((codes < 0) | (codes > maxq)).sum())
        codes = codes.clamp_(0, maxq).to(torch.int64)
        self.qweight = gptq.pack_rows(codes, bits).to(self.qweight.device)
        return clamped

    def weight_args(self) -> tuple:
        return (self.packed(), self.qzeros, self.scales, self.g_idx, self.bits, self.in_features)

    @property
    def quant_group_size(self) -> int | None:
        """``group_size`` when the groups are contiguous runs of ``in_features`` (no act-order permutation).
        The zero points are integers, so there is no :attr:`offset_group_size`: merges re-round."""
        g = self.group_size
        if g == -1 or self.in_features % g:
            return None
        contiguous = torch.arange(self.in_features, device=self.g_idx.device) // g
        return g if bool(torch.equal(self.g_idx.long(), contiguous)) else None


@register_layer(*GGUF_CONFIGS)
class LinearGGUF(QuantLinear):
    """A GGUF block-format layer (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q4_K/Q5_K/Q6_K; see :mod:`qtune.formats.gguf`).

    ``weight`` holds the GGUF file's bytes for this tensor unchanged: uint8 [out_features, in_features /
    block_size · type_size], row by row. :meth:`load_blocks_` sets them (the GGUF reader); :meth:`quantize_`
    writes the bytes the gguf package's quantizer would (32-weight types only).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: GGUFConfig, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias, config, **kw)
        if self.in_features % config.block_size:
            raise ValueError(f"{config.format}: in_features={self.in_features} is not a multiple of the "
                             f"{config.type_name} block size {config.block_size}")
        self.ggml_type = config.ggml_type
        self.register_buffer("weight", torch.zeros(self.out_features, config.row_bytes(self.in_features),
                                                   dtype=torch.uint8, device=kw.get("device")))

    def quantize_(self, weight: Tensor, *, name: str = "", **kwargs: Any) -> None:
        name = name or type(self).__name__
        _no_extras(kwargs, name)
        self.weight = gguf.quantize_gguf(weight, self.ggml_type, name=name)

    def load_blocks_(self, blocks: Tensor, *, name: str = "") -> None:
        """Take a GGUF tensor's bytes as they are.

        Args:
            blocks: uint8 [out_features, in_features / block_size · type_size].
        Raises:
            ValueError: wrong dtype or shape (the message names ``name``).
        """
        expected = (self.out_features, self.config.row_bytes(self.in_features))
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != expected:
            raise ValueError(f"{name or type(self).__name__}: {self.config.type_name} blocks must be uint8 {expected}, "
                             f"got {blocks.dtype} {tuple(blocks.shape)}")
        self.weight = blocks.to(self.weight.device).contiguous()

    def weight_args(self) -> tuple:
        return (self.packed(), self.ggml_type, self.in_features)

    # -- groups along in_features -----------------------------------------------------------------
    @property
    def quant_group_size(self) -> int:
        """The block (32) or, for the K-quants, the sub-block that has its own scale (32; Q6_K: 16)."""
        return self.config.scale_group

    @property
    def offset_group_size(self) -> int | None:
        """32 for Q4_1/Q5_1 (fp16 ``m`` per block); ``None`` for the types without an offset (Q4_0, Q5_0, Q8_0)
        and for the K-quants, whose mins are 6-bit codes times a shared ``dmin`` (a change cannot land exactly)."""
        return self.config.block_size if self.config.float_offset else None

    @torch.no_grad()
    def add_to_offsets_(self, delta: Tensor, *, name: str = "") -> None:
        """``m += delta`` in every block, rounded to fp16 (the block bytes are edited in place; ``d`` and the
        codes keep their bytes).

        Args:
            delta (Tensor): fp32 [out_features, in_features // 32], the change of block ``k`` of row ``o``.
        Raises:
            TypeError: a type without a float offset. ValueError: bad shape, NaN/Inf, or an offset that overflows fp16.
        """
        name = name or type(self).__name__
        if self.offset_group_size is None:
            super().add_to_offsets_(delta, name=name)
        delta = self._check_offset_delta(delta, name)
        cfg = self.config
        blocks = self.packed().view(self.out_features, -1, cfg.type_size)   # [N, K/32, type_size] uint8, a view
        m_bytes = blocks[:, :, _GGUF_OFFSET_BYTES]                           # [N, K/32, 2] (d, m, ... per block)
        m = m_bytes.contiguous().view(torch.float16).squeeze(-1).float()
        new = (m + delta.to(m.device)).to(torch.float16)
        if not bool(torch.isfinite(new).all()):
            raise ValueError(f"{name}: {cfg.type_name} offsets overflow fp16 after adding the change "
                             f"(max |m + Δ| {float((m + delta.to(m.device)).abs().max()):.4g})")
        blocks[:, :, _GGUF_OFFSET_BYTES] = new.unsqueeze(-1).view(torch.uint8)


# Q4_1/Q5_1 blocks start with fp16 d then fp16 m (qtune.formats.gguf's layout table)
_GGUF_OFFSET_BYTES = slice(2, 4)


@register_layer(AffineConfig)
class LinearAffine(QuantLinear):
    """Float-offset group layer ``Ŵ = s·q + m`` (see :mod:`qtune.formats.affine`).

    Buffers: ``weight`` uint8 [out_features, ceil(in_features/8)·bits] (packed codes, a little-endian bit stream
    per row), ``scale`` and ``offset`` fp16 [out_features, ceil(in_features/group_size)].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: AffineConfig, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias, config, **kw)
        device = kw.get("device")
        self.bits = config.bits
        self.group_size = config.group_size
        n, g = self.out_features, affine.n_groups(self.in_features, config.group_size)
        self.register_buffer("weight", torch.zeros(n, affine.packed_width(self.in_features, config.bits),
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(n, g, dtype=torch.float16, device=device))
        self.register_buffer("offset", torch.zeros(n, g, dtype=torch.float16, device=device))

    def quantize_(self, weight: Tensor, *, name: str = "", **kwargs: Any) -> None:
        name = name or type(self).__name__
        _no_extras(kwargs, name)
        t = affine.quantize_affine(weight, self.config, name=name)
        self.weight, self.scale, self.offset = t.weight, t.scale, t.offset

    def weight_args(self) -> tuple:
        return (self.packed(), self.scale, self.offset, self.bits, self.group_size, self.in_features)

    # -- exact merge of group-constant updates ---------------------------------------------------
    @property
    def offset_group_size(self) -> int | None:
        """Input columns that share one float offset (the group size): a ``ΔW`` constant over each group folds
        into :attr:`offset` exactly (:meth:`add_to_offsets_`)."""
        return self.group_size

    @torch.no_grad()
    def add_to_offsets_(self, delta: Tensor, *, name: str = "") -> None:
        """Add a per-group update to the offsets in place: ``m[n, j] ← fp16(m[n, j] + delta[n, j])``.

        The dequantized weight then changes by ``delta[n, k // group_size]`` at every ``(n, k)``, up to the
        fp16 rounding of the new offset; the codes and scales are unchanged.

        Args:
            delta: float [out_features, ceil(in_features / group_size)] (fp32 recommended).
            name: the layer's name, for error messages.
        Raises:
            ValueError: wrong shape, or an offset that is not finite in fp16 afterwards (nothing is changed).
        """
        name = name or type(self).__name__
        if tuple(delta.shape) != tuple(self.offset.shape):
            raise ValueError(f"{name}: offset update has shape {tuple(delta.shape)}, expected "
                             f"{tuple(self.offset.shape)} ([out_features, in_features / group_size])")
        new = (self.offset.float() + delta.to(device=self.offset.device, dtype=torch.float32)).to(self.offset.dtype)
        if not torch.isfinite(new).all():
            raise ValueError(f"{name}: offset update makes an offset non-finite in {self.offset.dtype}")
        self.offset.copy_(new)


def _no_extras(kwargs: dict, name: str) -> None:
    if kwargs:
        raise TypeError(f"{name}: unexpected arguments {sorted(kwargs)} for this format")
