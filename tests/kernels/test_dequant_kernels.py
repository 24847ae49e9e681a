"""Dequantize kernels vs the reference ops, under the Triton interpreter (bit-exact up to bf16 rounding)."""
import pytest
import torch

pytest.importorskip("triton")

import qtune  # noqa: E402,F401  (registers the qtune:: ops)
from qtune.kernels import dequantize_4bit, dequantize_affine, dequantize_gguf, dequantize_gptq, dequantize_int8  # noqa: E402
from qtune.ops import dequantize as ref_ops  # noqa: E402

from .cases import (DTYPES, GGUF, GGUF_TYPES, assert_dequant_equal, gguf_weight, gptq_weight, int8_weight,  # noqa: E402
                    nf4_weight)

SHAPES_4BIT = [((33, 77), 64), ((67, 301), 128), ((64, 256), 64)]  # odd N·K, K % bs != 0, aligned rows


@pytest.mark.parametrize("shape,blocksize", SHAPES_4BIT)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_4bit(shape, blocksize, quant_type, double_quant, dtype):
    w = nf4_weight(*shape, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    assert_dequant_equal(dequantize_4bit(*w, dtype), ref_ops.dequantize_4bit(*w, dtype))


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_4bit_large_odd(double_quant):
    w = nf4_weight(577, 1531, blocksize=128, double_quant=double_quant)
    assert_dequant_equal(dequantize_4bit(*w, torch.float16), ref_ops.dequantize_4bit(*w, torch.float16))


@pytest.mark.parametrize("block", [64, 256])
def test_dequantize_4bit_small_programs(block):
    # many programs and a partial last one; rows of a 64-element block split across programs (BLOCK < 32 bytes)
    w = nf4_weight(37, 100, blocksize=64, double_quant=True)
    out = dequantize_4bit(*w, torch.float16, config={"BLOCK": block})
    assert_dequant_equal(out, ref_ops.dequantize_4bit(*w, torch.float16))
    w = nf4_weight(20, 30, blocksize=32)
    assert_dequant_equal(dequantize_4bit(*w, torch.float32, config={"BLOCK": 8}),
                         ref_ops.dequantize_4bit(*w, torch.float32))


@pytest.mark.parametrize("blocksize", [6, 100])
def test_dequantize_4bit_any_even_blocksize(blocksize):
    # the op accepts any even block size; the kernel's non-power-of-two path gathers the absmax per byte
    n, k = 13, 41
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, ((n * k + 1) // 2, 1), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-n * k // blocksize), generator=g) + 0.1
    code = torch.linspace(-1, 1, 16)
    args = (packed, absmax, code, None, None, None, blocksize, [n, k])
    assert_dequant_equal(dequantize_4bit(*args, torch.float32), ref_ops.dequantize_4bit(*args, torch.float32))


@pytest.mark.parametrize("shape", [(33, 77), (67, 301)])
@pytest.mark.parametrize("symmetric,group_size", [(True, -1), (True, 32), (True, 50), (False, -1), (False, 128),
                                                  (False, 50)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_int8(shape, symmetric, group_size, dtype):
    w = int8_weight(*shape, symmetric=symmetric, group_size=group_size)
    assert_dequant_equal(dequantize_int8(*w, dtype), ref_ops.dequantize_int8(*w, dtype))


@pytest.mark.parametrize("symmetric,group_size", [(True, -1), (False, 128)])
def test_dequantize_int8_large_odd(symmetric, group_size):
    w = int8_weight(577, 1531, symmetric=symmetric, group_size=group_size)
    assert_dequant_equal(dequantize_int8(*w, torch.float16), ref_ops.dequantize_int8(*w, torch.float16))


@pytest.mark.parametrize("config", [{"BLOCK_N": 16, "BLOCK_K": 32}, {"BLOCK_N": 16, "BLOCK_K": 256}])
def test_dequantize_int8_group_paths(config):
    # group 64: one scale per tile (BLOCK_K 32) and several groups per tile (BLOCK_K 256)
    for symmetric in (True, False):
        w = int8_weight(40, 300, symmetric=symmetric, group_size=64)
        assert_dequant_equal(dequantize_int8(*w, torch.float16, config=config),
                             ref_ops.dequantize_int8(*w, torch.float16))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape,group_size", [((67, 301), 32), ((40, 77), 128), ((96, 300), -1)])
def test_dequantize_gptq(bits, act_order, shape, group_size):
    w = gptq_weight(*shape, bits=bits, group_size=group_size, act_order=act_order)
    for dtype in DTYPES if shape == (40, 77) else (torch.float16,):
        assert_dequant_equal(dequantize_gptq(*w, dtype), ref_ops.dequantize_gptq(*w, dtype))


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_gptq_large_odd(act_order):
    w = gptq_weight(577, 1531, bits=3, group_size=128, act_order=act_order)
    assert_dequant_equal(dequantize_gptq(*w, torch.float16), ref_ops.dequantize_gptq(*w, torch.float16))


@pytest.mark.parametrize("group_size,block_k", [(128, 32), (32, 256), (50, 64), (64, 64)])
@pytest.mark.parametrize("bits", [3, 4])
def test_dequantize_gptq_group_paths(group_size, block_k, bits):
    # GROUP_SIZE a multiple of BLOCK_K (one scale row per tile), BLOCK_K a multiple of it (several rows),
    # neither (per-row gather without g_idx); act-order is covered above
    w = gptq_weight(70, 300, bits=bits, group_size=group_size)
    out = dequantize_gptq(*w, torch.float32, config={"BLOCK_K": block_k, "BLOCK_N": 32})
    assert_dequant_equal(out, ref_ops.dequantize_gptq(*w, torch.float32))


def test_trivial_group_size_detection():
    from qtune.kernels.dequant_gptq import trivial_group_size

    k = 300
    g_idx = (torch.arange(k) // 64).to(torch.int32)
    assert trivial_group_size(g_idx, 5, k) == 64
    assert trivial_group_size(g_idx, 5, k) == 64  # cached
    g_idx[:] = g_idx[torch.randperm(k)]           # in place: the version counter invalidates the cache
    assert trivial_group_size(g_idx, 5, k) == 0
    assert trivial_group_size(torch.zeros(k, dtype=torch.int32), 1, k) == 512  # one group: a power of two ≥ K


# -- GGUF: every block type, bit for bit against the reference (itself gguf.quants.dequantize) ------------------
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # d = ±65504 → ±inf in fp16
@pytest.mark.parametrize("cfg", GGUF_TYPES, ids=lambda c: c.type_name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_gguf(cfg, dtype):
    # 3 blocks per row (a partial last tile), edge fp16 fields (−0, 0, subnormal, ±65504: fp16 overflow to ±inf)
    w = gguf_weight(cfg, 5, 3 * cfg.block_size, edge=True)
    out = dequantize_gguf(*w, dtype)
    ref = ref_ops.dequantize_gguf(*w, dtype)
    if dtype == torch.float32:
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32))   # −0 vs 0 too
    else:
        assert_dequant_equal(out, ref)


@pytest.mark.parametrize("cfg", GGUF_TYPES, ids=lambda c: c.type_name)
@pytest.mark.parametrize("block_k", [32, 64, 512])
def test_dequantize_gguf_tiles(cfg, block_k):
    # BLOCK_K 32/64: a tile is part of one 256-weight K-quant block (its sub-blocks picked by k0), 512: several
    # blocks per tile; BLOCK_N 4 over 7 rows: a partial row tile
    w = gguf_weight(cfg, 7, 2 * cfg.block_size, seed=block_k)
    out = dequantize_gguf(*w, torch.float32, config={"BLOCK_N": 4, "BLOCK_K": block_k})
    assert torch.equal(out.view(torch.int32), ref_ops.dequantize_gguf(*w, torch.float32).view(torch.int32))


def test_dequantize_gguf_validation():
    w = gguf_weight(GGUF["Q4_1"], 4, 64)
    with pytest.raises(ValueError, match="GGML type 1 has no kernel"):
        dequantize_gguf(w[0], 1, 64, torch.float16)                       # F16 is not a block type
    with pytest.raises(ValueError, match="do not hold in_features=96"):
        dequantize_gguf(w[0], w[1], 96, torch.float16)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_gguf(w[0].view(torch.int8), w[1], 64, torch.float16)
    with pytest.raises(ValueError, match="BLOCK_K=16"):
        dequantize_gguf(*w, torch.float16, config={"BLOCK_N": 4, "BLOCK_K": 16})
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group_size", [((33, 77), 32), ((67, 301), 128), ((64, 256), 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_affine(bits, shape, group_size, dtype):
    # K not a multiple of 8 (padded codes), partial last groups, and aligned rows; random codes, scales, offsets
    from qtune.formats.affine import n_groups, pack_codes

    n, k = shape
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scale = (torch.rand(n, n_groups(k, group_size), generator=g) * 0.1 + 1e-3).half()
    offset = (torch.randn(n, n_groups(k, group_size), generator=g) * 0.2).half()
    args = (pack_codes(codes, bits), scale, offset, bits, group_size, k)
    assert_dequant_equal(dequantize_affine(*args, dtype), ref_ops.dequantize_affine(*args, dtype))


def test_dequantize_affine_small_tiles_and_quantized_layer():
    # many programs with partial tiles along both dimensions, on a layer the quantizer filled
    from qtune.formats import AffineConfig
    from qtune.nn import LinearAffine

    layer = LinearAffine.from_float(torch.nn.Linear(200, 37), AffineConfig(bits=3, group_size=32))
    w = layer.weight_args()
    out = dequantize_affine(*w, torch.float16, config={"BLOCK_N": 16, "BLOCK_K": 64})
    assert_dequant_equal(out, ref_ops.dequantize_affine(*w, torch.float16))
    # tiles narrower than a group: one scale and offset per row and tile
    layer = LinearAffine.from_float(torch.nn.Linear(200, 37), AffineConfig(bits=4, group_size=128))
    w = layer.weight_args()
    out = dequantize_affine(*w, torch.float32, config={"BLOCK_N": 16, "BLOCK_K": 32})
    assert_dequant_equal(out, ref_ops.dequantize_affine(*w, torch.float32))
    with pytest.raises(ValueError, match="scale"):
        dequantize_affine(w[0], w[1][:, :1], w[2], *w[3:], torch.float32)
