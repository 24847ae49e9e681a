"""Fused GPTQ forward and backward kernels vs the reference ops, under the Triton interpreter."""
import pytest
import torch

pytest.importorskip("triton")

import qtune  # noqa: E402,F401
from qtune.kernels import linear_gptq, linear_gptq_grad_input  # noqa: E402
from qtune.ops import dequantize as ref_ops  # noqa: E402

from .cases import DTYPES, activations, assert_product_close, gptq_weight  # noqa: E402

SPLIT = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 3}


def check(m, k, n, dtype, bits, *, group_size=32, act_order=False, bias=True, config=None, split=1):
    w = gptq_weight(n, k, bits, group_size=group_size, act_order=act_order)
    x = activations(m, k, dtype)
    b = activations(1, n, dtype, seed=2).view(n) if bias else None
    fwd_cfg = None if config is None else {**config, "SPLIT_K": split}
    bwd_cfg = None if config is None else {**config, "SPLIT_N": split}
    what = f"M={m} K={k} N={n} {dtype} {bits}-bit g{group_size} act={act_order} {config} split={split}"
    w32 = ref_ops.dequantize_gptq(*w, torch.float32)
    assert_product_close(linear_gptq(x, *w, b, config=fwd_cfg), x, w32.t(), b, "forward " + what)
    dy = activations(m, n, dtype, seed=3)
    assert_product_close(linear_gptq_grad_input(dy, *w, config=bwd_cfg), dy, w32, None, "backward " + what)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_bits_and_act_order(bits, act_order):
    check(2, 333, 200, torch.float16, bits, act_order=act_order)  # K not a multiple of 32: padded words


def test_large_odd_shape():
    check(1, 577, 1531, torch.float16, 4, act_order=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [-1, 50, 128])
def test_dtypes_and_groups(dtype, group_size):
    # 128 spans whole tiles (one scale row per tile), 50 is neither (per-row gather), -1 one group
    check(4, 300, 96, dtype, 4 if dtype != torch.float32 else 3, group_size=group_size, bias=group_size != 50)


@pytest.mark.parametrize("bits,act_order,dtype", [(4, False, torch.float16), (3, True, torch.bfloat16)])
def test_tiled_gemm(bits, act_order, dtype):
    check(80, 256, 100, dtype, bits, act_order=act_order, config=GEMM)


@pytest.mark.parametrize("bits", [3, 4])
def test_split_k_decode(bits):
    check(5, 512, 130, torch.float16, bits, act_order=bits == 3, config=SPLIT, split=4)


def test_validation():
    w = gptq_weight(40, 128, 4)
    with pytest.raises(ValueError, match="features"):
        linear_gptq(activations(2, 64, torch.float16), *w, None)
    with pytest.raises(ValueError, match="bits"):
        linear_gptq(activations(2, 128, torch.float16), *w[:4], 5, 128, None)
