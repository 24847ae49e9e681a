"""8-bit kernels under the Triton interpreter: fused weight-only int8 forward/backward, and LLM.int8()
(int8×int8 GEMM with the scaling epilogue, outlier decomposition, row quantization) vs the reference ops."""
import pytest
import torch

pytest.importorskip("triton")

import qtune  # noqa: E402,F401
from qtune.formats import int8  # noqa: E402
from qtune.kernels import (linear_int8, linear_int8_grad_input, linear_llm_int8,  # noqa: E402
                           linear_llm_int8_grad_input)
from qtune.ops import LINEAR_OPS  # noqa: E402
from qtune.ops import dequantize as ref_ops  # noqa: E402

from .cases import DTYPES, activations, assert_llm_int8_close, assert_product_close, int8_weight  # noqa: E402

SPLIT = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric,group_size", [(True, -1), (True, 64), (False, -1), (False, 50)])
def test_linear_int8(dtype, symmetric, group_size):
    w = int8_weight(96, 300, symmetric=symmetric, group_size=group_size)
    x = activations(3, 300, dtype)
    b = activations(1, 96, dtype, seed=2).view(96)
    w32 = ref_ops.dequantize_int8(*w, torch.float32)
    assert_product_close(linear_int8(x, *w, b), x, w32.t(), b, "forward")
    dy = activations(3, 96, dtype, seed=3)
    assert_product_close(linear_int8_grad_input(dy, *w), dy, w32, None, "backward")


@pytest.mark.parametrize("m,config,split", [(1, None, 1), (5, SPLIT, 4),
                                            (80, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2}, 1)])
def test_linear_int8_shapes(m, config, split):
    w = int8_weight(1531 if m == 1 else 130, 577, symmetric=False, group_size=128)
    n = w[0].shape[0]
    x = activations(m, 577, torch.float16)
    fwd = None if config is None else {**config, "SPLIT_K": split}
    bwd = None if config is None else {**config, "SPLIT_N": split}
    w32 = ref_ops.dequantize_int8(*w, torch.float32)
    assert_product_close(linear_int8(x, *w, None, config=fwd), x, w32.t(), None, "forward")
    dy = activations(m, n, torch.float16, seed=3)
    assert_product_close(linear_int8_grad_input(dy, *w, config=bwd), dy, w32, None, "backward")


def _llm_weight(n, k):
    g = torch.Generator().manual_seed(0)
    t = int8.quantize_int8(torch.randn(n, k, generator=g), int8.LLMInt8Config())
    return t.weight, t.scale[:, 0].contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("m,k,n", [(1, 577, 1531), (70, 300, 200)])
def test_linear_llm_int8(dtype, threshold, m, k, n):
    if n == 1531 and dtype != torch.float16:
        n = 200
    weight, scb = _llm_weight(n, k)
    x = activations(m, k, dtype)
    x[:, 3] *= 20  # an outlier column (|x| >= 6 somewhere)
    bias = activations(1, n, dtype, seed=2).view(n)
    out = linear_llm_int8(x, weight, scb, threshold, bias)
    ref = LINEAR_OPS["llm_int8"](x, weight, scb, threshold, bias)
    assert_llm_int8_close(out, x, weight, scb, threshold, bias)
    if dtype != torch.bfloat16:  # (the interpreter rounds bf16 toward zero, the reference to nearest)
        # same int8 codes, exact int32 product, the reference's fp32 epilogue: equal up to FMA-free rounding
        torch.testing.assert_close(out, ref, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)
    dy = activations(m, n, dtype, seed=3)
    w32 = ref_ops.dequantize_int8(weight, scb.view(-1, 1), None, -1, torch.float32)
    assert_product_close(linear_llm_int8_grad_input(dy, weight, scb, threshold), dy, w32, None, "backward")



def test_llm_int8_row_quantization_is_exact():
    from qtune.kernels.matmul_llm_int8 import quantize_rows

    x = torch.randn(50, 333) * 3
    x[7] = 0.0                                   # an all-zero row
    x[3, 10] = 7.25                               # ties and outliers
    flags = (x.abs() >= 6.0).any(0)
    xq, sx = quantize_rows(x, flags, 6.0, config={"BLOCK_M": 8, "BLOCK_K": 128})
    x_in = x.masked_fill(x.abs() >= 6.0, 0)
    ref_sx = x_in.abs().amax(1)
    ref_q = torch.round(x_in * (127.0 / ref_sx.clamp(min=1e-12)).unsqueeze(-1)).to(torch.int8)
    ref_q[:, flags] = 0
    assert torch.equal(sx, ref_sx) and torch.equal(xq, ref_q)


def test_llm_int8_gemm_tiles():
    from qtune.kernels.matmul_llm_int8 import int8_matmul_scaled

    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-127, 128, (37, 200), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (90, 200), dtype=torch.int8, generator=g)
    sx, sw = torch.rand(37, generator=g) + 0.5, torch.rand(90, generator=g) + 0.5
    out = int8_matmul_scaled(xq, w, sx, sw, None, torch.float32,
                             config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2})
    ref = int8.int8_matmul(xq, w).float() * (sx[:, None] * sw[None, :]) * (1.0 / (127.0 * 127.0))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
