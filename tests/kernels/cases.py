"""Weights, tolerances and comparisons shared by the kernel tests."""
from __future__ import annotations

import torch

from qtune.formats import gptq, int8, nf4

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# max |kernel − reference| / max |reference| for a matmul in each activation dtype. bf16 is looser
# than its 2⁻⁸ epsilon because the interpreter truncates bf16 (dequantized weights and outputs are up
# to 1 ulp off torch's round-to-nearest), on top of the reference's own bf16 rounding.
MATMUL_TOL = {torch.float16: 3e-3, torch.bfloat16: 3e-2, torch.float32: 2e-5}


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


def activations(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype)


def assert_matmul_close(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    err = (out.double() - ref.double()).abs().max().item()
    scale = max(ref.double().abs().max().item(), 1e-30)
    tol = MATMUL_TOL[ref.dtype]
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} × max|ref| {scale:.3g}"


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
