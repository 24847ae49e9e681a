"""Fused NF4/FP4 forward and backward kernels vs the reference ops, under the Triton interpreter."""
import pytest
import torch

pytest.importorskip("triton")

import qtune  # noqa: E402,F401
from qtune.kernels import linear_4bit, linear_4bit_grad_input  # noqa: E402
from qtune.ops import dequantize as ref_ops  # noqa: E402

from .cases import DTYPES, activations, assert_product_close, nf4_weight  # noqa: E402

GEMM_ALIGNED = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 3}
GEMM_WIDE_K = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 2, "num_warps": 8, "num_stages": 3}
SPLIT = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}


def check(m, k, n, dtype, *, quant_type="nf4", blocksize=64, double_quant=False, bias=True, config=None,
          split=1, x_shape=None):
    w = nf4_weight(n, k, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    x = activations(m, k, dtype)
    if x_shape is not None:
        x = x.view(*x_shape, k)
    b = activations(1, n, dtype, seed=2).view(n) if bias else None
    fwd_cfg = None if config is None else {**config, "SPLIT_K": split}
    bwd_cfg = None if config is None else {**config, "SPLIT_N": split}
    what = f"M={m} K={k} N={n} {dtype} {quant_type} bs{blocksize} dq={double_quant} {config} split={split}"
    w32 = ref_ops.dequantize_4bit(*w, torch.float32)
    assert_product_close(linear_4bit(x, *w, b, config=fwd_cfg), x, w32.t(), b, "forward " + what)
    dy = activations(m, n, dtype, seed=3).view(*x.shape[:-1], n)
    assert_product_close(linear_4bit_grad_input(dy, *w, config=bwd_cfg), dy, w32, None, "backward " + what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dtypes(dtype, double_quant):
    check(5, 320, 96, dtype, double_quant=double_quant, quant_type="fp4" if double_quant else "nf4")


@pytest.mark.parametrize("m,k,n,dtype,kw", [
    (1, 577, 1531, torch.float16, dict(double_quant=True)),                      # odd K: rows start mid-byte
    (1, 576, 300, torch.bfloat16, dict(quant_type="fp4", bias=False)),           # rows aligned to blocks
    (1, 1000, 300, torch.float32, dict(blocksize=64)),                           # even K, blocks straddle rows
    (3, 333, 77, torch.bfloat16, dict(blocksize=32, double_quant=True, bias=False)),
])
def test_odd_shapes(m, k, n, dtype, kw):
    check(m, k, n, dtype, **kw)


@pytest.mark.parametrize("config,dtype", [(GEMM_ALIGNED, torch.float16), (GEMM_WIDE_K, torch.bfloat16)])
def test_tiled_gemm(config, dtype):
    # M spans several row tiles; BLOCK_K <= blocksize reads one absmax per row, BLOCK_K > blocksize gathers
    check(80, 256, 100, dtype, double_quant=True, config=config)


@pytest.mark.parametrize("k", [512, 333])
def test_split_k_decode(k):
    # SPLIT_K programs accumulate fp32 partial sums with atomics (bias added once)
    check(5, k, 130, torch.float16, double_quant=True, config=SPLIT, split=4)


@pytest.mark.parametrize("k", [400, 410])
def test_blocksize_not_a_power_of_two(k):
    # the op takes any even block size: 100 is not a multiple of BLOCK_K (tiles straddle blocks)
    n, blocksize = 30, 100
    g = torch.Generator().manual_seed(4)
    packed = torch.randint(0, 256, ((n * k + 1) // 2, 1), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-n * k // blocksize), generator=g) + 0.1
    w = (packed, absmax, torch.linspace(-1, 1, 16), None, None, None, blocksize, [n, k])
    x = activations(3, k, torch.float16)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1}
    w32 = ref_ops.dequantize_4bit(*w, torch.float32)
    assert_product_close(linear_4bit(x, *w, None, config=cfg), x, w32.t())
    dy = activations(3, n, torch.float16, seed=3)
    assert_product_close(linear_4bit_grad_input(dy, *w, config=cfg), dy, w32)


def test_batched_input_and_fp64_fallback():
    check(6, 128, 40, torch.float16, x_shape=(2, 3))
    w = nf4_weight(40, 128)
    x = activations(4, 128, torch.float64)
    torch.testing.assert_close(linear_4bit(x, *w, None), x @ ref_ops.dequantize_4bit(*w, torch.float64).t())


def test_validation():
    w = nf4_weight(40, 128)
    with pytest.raises(ValueError, match="features"):
        linear_4bit(activations(2, 64, torch.float16), *w, None)
    with pytest.raises(ValueError, match="nested"):
        linear_4bit(activations(2, 128, torch.float16), w[0], w[1].to(torch.uint8), *w[2:], None)
