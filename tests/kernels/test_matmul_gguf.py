"""Fused GGUF forward and backward kernels vs the reference, under the Triton interpreter: every block type,
every activation dtype, decode (split) and GEMM tiles, and the op with autograd through the routing wrappers."""
import pytest
import torch

pytest.importorskip("triton")

import qtune  # noqa: E402,F401
from qtune.kernels import linear_gguf, linear_gguf_grad_input, routing  # noqa: E402
from qtune.ops import dequantize as ref_ops  # noqa: E402
from qtune.ops import dispatch  # noqa: E402

from .cases import DTYPES, GGUF, GGUF_TYPES, activations, assert_product_close, gguf_weight  # noqa: E402

SPLIT = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
GEMM = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 3}


def check(cfg, m, n, dtype, *, bias=True, config=None, split=1, blocks=2):
    k = blocks * cfg.block_size
    w = gguf_weight(cfg, n, k)
    x = activations(m, k, dtype)
    b = activations(1, n, dtype, seed=2).view(n) if bias else None
    fwd_cfg = None if config is None else {**config, "SPLIT_K": split}
    bwd_cfg = None if config is None else {**config, "SPLIT_N": split}
    what = f"{cfg.type_name} M={m} K={k} N={n} {dtype} {config} split={split}"
    w32 = ref_ops.dequantize_gguf(*w, torch.float32)
    assert_product_close(linear_gguf(x, *w, b, config=fwd_cfg), x, w32.t(), b, "forward " + what)
    dy = activations(m, n, dtype, seed=3)
    assert_product_close(linear_gguf_grad_input(dy, *w, config=bwd_cfg), dy, w32, None, "backward " + what)


@pytest.mark.parametrize("cfg", GGUF_TYPES, ids=lambda c: c.type_name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_type_and_dtype(cfg, dtype):
    # 4×64 (K-quants: 4×256), N = 40: a partial N tile
    check(cfg, 4, 40, dtype, bias=dtype != torch.float32, blocks=2 if cfg.block_size == 32 else 1)


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K", "Q6_K"])
def test_split_decode(name):
    # split-K / split-N partial sums (atomic_add); K-quants: BLOCK_K 64 is a quarter of a block
    check(GGUF[name], 3, 48, torch.float16, config=SPLIT, split=2, blocks=4 if name == "Q4_1" else 1)


@pytest.mark.parametrize("name", ["Q5_0", "Q5_K"])
def test_tiled_gemm(name):
    check(GGUF[name], 40, 36, torch.float16, config=GEMM, blocks=3 if name == "Q5_0" else 1)


@pytest.mark.parametrize("name,m", [("Q8_0", 2), ("Q4_K", 2), ("Q4_0", 20)])
def test_op_autograd_through_routing(name, m):
    """``qtune::linear_gguf`` with autograd, with the routing wrappers standing in for the CUDA registration:
    the forward picks by M (fused ≤ 16), the input gradient re-dequantizes (dequantize + matmul) from the
    blocks the op saved."""
    cfg = GGUF[name]
    k, n = 2 * cfg.block_size if cfg.block_size == 32 else 256, 24
    w = gguf_weight(cfg, n, k)
    w32 = ref_ops.dequantize_gguf(*w, torch.float32)
    x = activations(m, k, torch.float16).requires_grad_(True)
    dy = activations(m, n, torch.float16, seed=3)
    with dispatch.record() as log:
        y = routing.linear_gguf(x, *w, None)
        dx = routing.linear_gguf_grad_input(dy, *w)
    assert log == [("gguf", "forward", m, "fused" if m <= 16 else "dequant"), ("gguf", "grad_input", m, "dequant")]
    assert_product_close(y, x.detach(), w32.t(), None, f"{name} forward")
    assert_product_close(dx, dy, w32, None, f"{name} grad_input")


def test_validation():
    w = gguf_weight(GGUF["Q4_K"], 8, 256)
    with pytest.raises(ValueError, match="features"):
        linear_gguf(activations(2, 128, torch.float16), *w, None)
    with pytest.raises(ValueError, match="rows"):
        linear_gguf_grad_input(activations(2, 9, torch.float16), *w)
    with pytest.raises(ValueError, match="no kernel"):
        linear_gguf(activations(2, 256, torch.float16), w[0], 10, 256, None)   # Q2_K: no qtune layer
    with pytest.raises(ValueError, match="BLOCK_K=16"):
        linear_gguf(activations(2, 256, torch.float16), *w, None, config={**SPLIT, "BLOCK_K": 16})
