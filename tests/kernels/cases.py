"""Weights, tolerances and comparisons shared by the kernel tests."""
from __future__ import annotations

import torch

from qtune.formats import gguf, gptq, int8, nf4

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
_MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}
_MIN_NORMAL_EXP = {torch.float16: -14, torch.bfloat16: -126, torch.float32: -126}


def nf4_weight(n: int, k: int, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
               seed: int = 0) -> tuple:
    """The ``qtune::dequantize_4bit`` / ``linear_4bit`` weight arguments of a random [n, k] weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    cfg = (nf4.NF4Config if quant_type == "nf4" else nf4.FP4Config)(blocksize=blocksize, double_quant=double_quant)
    t = nf4.quantize_4bit(w, cfg)
    return (t.packed, t.absmax, t.code, t.nested_absmax, t.nested_code, t.nested_offset, blocksize, [n, k])


def gptq_weight(n: int, k: int, bits: int, group_size: int = 32, act_order: bool = False, sym: bool = False,
                seed: int = 0) -> tuple:
    """``(qweight, qzeros, scales, g_idx, bits, in_features)``; act-order shuffles ``g_idx``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    t = gptq.quantize_rtn(w, gptq.RTNConfig(bits=bits, group_size=group_size, sym=sym))
    g_idx = t.g_idx
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)].contiguous()
    return (t.qweight, t.qzeros, t.scales, g_idx, bits, k)


def int8_weight(n: int, k: int, symmetric: bool = True, group_size: int = -1, seed: int = 0) -> tuple:
    """``(weight, scale, zero, group_size)``."""
    g = torch.Generator().manual_seed(seed)
    t = int8.quantize_int8(torch.randn(n, k, generator=g), int8.Int8Config(symmetric=symmetric, group_size=group_size))
    return (t.weight, t.scale, t.zero, t.group_size)


GGUF_TYPES = list(gguf.GGUF_CONFIGS)  # every GGUF block type (config classes), 32-weight types first
GGUF = {c.type_name: c for c in GGUF_TYPES}
# byte offsets of each type's fp16 fields (d, m / dmin): random bytes there could be NaN or huge
_GGUF_FP16 = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,)}
# fp16 edge values written into some blocks by ``gguf_weight(edge=True)``: −0, 0, the smallest subnormal,
# the largest finite fp16 and its negative, a large power of two
_GGUF_EDGES = (-0.0, 0.0, 2.0 ** -24, 65504.0, -65504.0, 2.0 ** 15)


def gguf_weight(cfg: type, n: int, k: int, seed: int = 0, edge: bool = False) -> tuple:
    """``(weight, ggml_type, in_features)`` of random GGUF blocks of type ``cfg``: random code and scale
    bytes, every fp16 field a random finite value (|d| ≈ 0.05); with ``edge`` the fp16 fields of the
    first 12 blocks take the values of ``_GGUF_EDGES`` (−0, 0, subnormal, ±65504: products overflow fp16)."""
    g = torch.Generator().manual_seed(seed)
    nb = n * k // cfg.block_size
    blocks = torch.randint(0, 256, (nb, cfg.type_size), dtype=torch.uint8, generator=g)
    for off in _GGUF_FP16[cfg.type_name]:
        d = (torch.randn(nb, generator=g) * 0.05).to(torch.float16)
        if edge:  # each edge value in two blocks (of different rows when a row holds fewer than 12 blocks)
            first = min(nb, 2 * len(_GGUF_EDGES))
            d[:first] = torch.tensor(_GGUF_EDGES, dtype=torch.float16)[torch.arange(first) % len(_GGUF_EDGES)]
        blocks[:, off:off + 2] = d.view(torch.uint8).reshape(nb, 2)
    return (blocks.reshape(n, cfg.row_bytes(k)), cfg.ggml_type, k)


def affine_weight(n: int, k: int, bits: int, group_size: int = 64, seed: int = 0) -> tuple:
    """``(weight, scale, offset, bits, group_size, in_features)`` of random affine codes (every code value),
    fp16 scales in [1e-3, 0.1) and fp16 offsets ≈ N(0, 0.2²) (offsets of either sign and size comparable to
    ``s·q``, so a dropped or misplaced offset shows)."""
    from qtune.formats.affine import n_groups, pack_codes

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scale = (torch.rand(n, n_groups(k, group_size), generator=g) * 0.1 + 1e-3).half()
    offset = (torch.randn(n, n_groups(k, group_size), generator=g) * 0.2).half()
    return (pack_codes(codes, bits), scale, offset, bits, group_size, k)


def activations(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype)


def kernel_rounded(w32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 dequantized weight rounded to ``dtype`` as the kernels round it, as fp32 values.

    On a GPU fp32 → 16-bit casts round to nearest even; the Triton interpreter (these tests) rounds fp32
    → bf16 toward zero (it drops the low 16 bits; fp16 rounds to nearest), so the bf16 weight a kernel
    multiplies is the truncated one. Checked bit for bit by ``test_dequant_kernels``.
    """
    from qtune.kernels._common import INTERPRET

    w32 = w32.float().contiguous()
    if dtype == torch.bfloat16 and INTERPRET:
        return (w32.view(torch.int32) & -65536).view(torch.float32)
    return w32.to(dtype).float()


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at ``|v|`` (fp64 in, fp64 out; the subnormal spacing below the normal range)."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -150)))
    e = e.clamp_min(_MIN_NORMAL_EXP[dtype])
    return torch.pow(2.0, e - _MANTISSA[dtype])


def product_bound(a: torch.Tensor, w_t: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest |kernel − ref| a correct kernel can show: one ulp of ``dtype`` at ``ref`` (the final
    rounding: half an ulp to nearest, under one toward zero) plus the worst fp32 accumulation error of
    any summation order, ``K·2⁻²⁴·Σ|a||w|`` (Higham's γ_K bound)."""
    k = a.shape[-1]
    absprod = a.double().abs() @ w_t.double().abs()
    return ulp(ref, dtype) + k * 2.0 ** -24 * absprod


def assert_product_close(out: torch.Tensor, a: torch.Tensor, w32_t: torch.Tensor, bias: torch.Tensor | None = None,
                         what: str = "") -> None:
    """``out ≈ a @ w32_t (+ bias)`` at ulp level, in every dtype.

    ``w32_t`` is the fp32 dequantized weight oriented for the product ([K, N] in forward, i.e. ``Ŵᵀ``;
    [N, K] in backward). The reference is the fp64 product of ``a`` and the *same* ``out.dtype``-rounded
    weight the kernel multiplies (:func:`kernel_rounded`), so a swapped nibble, a wrong scale or a zeroed
    column shows as an error of many ulps, while the 16-bit rounding of the weight costs nothing.
    """
    dtype = out.dtype
    assert a.dtype == dtype, (a.dtype, dtype)
    a2 = a.reshape(-1, a.shape[-1])
    w = kernel_rounded(w32_t, dtype).double()
    ref = a2.double() @ w
    if bias is not None:
        ref = ref + bias.double()
    out2 = out.reshape(ref.shape).double()
    err = (out2 - ref).abs()
    bound = product_bound(a2, w, ref, dtype)
    bad = err > bound
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} outputs off by more than 1 ulp "
                                 f"(+ fp32 accumulation bound); worst {float((err - bound).max()):.3g} over, "
                                 f"max error {float(err.max()):.3g}")


def assert_llm_int8_close(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
                          threshold: float, bias: torch.Tensor | None, what: str = "") -> None:
    """LLM.int8 forward at ulp level: the int8 part (the reference's codes, an exact int32 product, the fp32
    epilogue ``acc · (s_x s_w) / 127² + b``) is rounded once to ``x.dtype`` by the kernel, then the outlier
    ``addmm`` in ``x.dtype`` adds its columns and rounds again: within one ulp of each rounded value, plus
    the fp32-accumulation bound of the outlier product."""
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    x32 = x2.float()
    out = out.reshape(x2.shape[0], -1)
    if threshold > 0:
        flags = (x32.abs() >= threshold).any(0)
        x_in = x32.masked_fill(x32.abs() >= threshold, 0)
    else:
        flags = torch.zeros(x2.shape[-1], dtype=torch.bool)
        x_in = x32
    sx = x_in.abs().amax(1)
    xq = torch.round(x_in * (127.0 / sx.clamp(min=1e-12)).unsqueeze(-1))
    xq[:, flags] = 0
    scb = scb.reshape(-1).float()
    y_int = (xq.double() @ weight.double().t()).float() * (sx[:, None] * scb[None, :]) * (1.0 / (127.0 * 127.0))
    y_int = y_int.double() + (0.0 if bias is None else bias.double())
    cols = flags.nonzero().view(-1)
    sub_w = (weight[:, cols].float() * (scb / 127.0).unsqueeze(-1)).to(dtype).double()
    x_o = x2[:, cols].double()
    ref = y_int + x_o @ sub_w.t()
    bound = ulp(y_int, dtype) + ulp(ref, dtype) + cols.numel() * 2.0 ** -24 * (x_o.abs() @ sub_w.abs().t())
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), (f"{what}: LLM.int8 max error {float(err.max()):.3g}, worst excess over "
                                        f"the ulp bound {float((err - bound).max()):.3g}")


def assert_dequant_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-identical, except that bf16 may be 1 ulp off: the interpreter rounds fp32 → bf16 toward zero."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.dtype != torch.bfloat16:
        assert torch.equal(out, ref), f"max difference {(out.double() - ref.double()).abs().max().item()}"
        return
    ulp = (torch.nextafter(ref.abs(), torch.full_like(ref, float("inf"))).float() - ref.abs().float())
    diff = (out.float() - ref.float()).abs()
    assert bool((diff <= ulp).all()), f"bf16 off by more than 1 ulp: {diff.max().item()}"
    # and the rounding is toward zero, never away from it
    assert bool((out.float().abs() <= ref.float().abs()).all())
