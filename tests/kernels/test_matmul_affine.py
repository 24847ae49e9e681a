"""Fused affine forward and backward kernels vs the reference, under the Triton interpreter: every code width
(2/3/4/8 bits, 3-bit codes straddling bytes), groups of 32/64/128, K not a multiple of the tile, of 8 or of the
group, every activation dtype, decode (split) and GEMM tiles, tiles inside one group and groups inside one tile,
and the routing wrappers that the CUDA registration installs for ``qtune::linear_affine``.

The reference is :func:`qtune.formats.affine.dequantize_affine` (fp32) followed by an fp64 matmul; the kernels
must agree within one ulp of the output dtype plus the fp32 accumulation bound (``assert_product_close``)."""
import pytest
import torch

pytest.importorskip("triton")

import qtune  # noqa: E402,F401
from qtune.formats.affine import dequantize_affine as reference_dequantize  # noqa: E402
from qtune.kernels import linear_affine, linear_affine_grad_input, routing  # noqa: E402
from qtune.ops import dispatch  # noqa: E402

from .cases import DTYPES, activations, affine_weight, assert_product_close  # noqa: E402

SPLIT = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
GEMM = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 3}


def check(m, n, k, bits, group_size, dtype, *, bias=True, config=None, split=1, seed=0):
    """Forward ``x Ŵᵀ + b`` and backward ``dy Ŵ`` of one random affine weight against the reference."""
    w = affine_weight(n, k, bits, group_size, seed=seed)
    x = activations(m, k, dtype)
    b = activations(1, n, dtype, seed=2).view(n) if bias else None
    fwd_cfg = None if config is None else {**config, "SPLIT_K": split}
    bwd_cfg = None if config is None else {**config, "SPLIT_N": split}
    what = f"{bits}-bit g{group_size} M={m} K={k} N={n} {dtype} {config} split={split}"
    w32 = reference_dequantize(*w, torch.float32)
    assert_product_close(linear_affine(x, *w, b, config=fwd_cfg), x, w32.t(), b, "forward " + what)
    dy = activations(m, n, dtype, seed=3)
    assert_product_close(linear_affine_grad_input(dy, *w, config=bwd_cfg), dy, w32, None, "backward " + what)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,k", [(32, 77), (128, 200)])
def test_every_bits_and_group_size(bits, group_size, k):
    # K = 77: not a multiple of 8 (padded codes) nor of the group (a partial last group); the interpreter's
    # tile (BLOCK_K = 128) spans 4 groups. K = 200: a whole group of 128 and a partial one of 72 in one tile
    # (BLOCK_K = 256). N = 40: a partial N tile.
    check(4, 40, k, bits, group_size, torch.float16, seed=bits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype(dtype):
    check(3, 24, 136, 4, 64, dtype, bias=dtype != torch.float32)


@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, 128)])
def test_split_decode(bits, group_size):
    # split-K / split-N partial sums (atomic_add) with BLOCK_K = 64: two groups in a tile (g32), a tile inside a
    # group (g128); K = 300 leaves a ragged last tile and a partial last group
    check(3, 48, 300, bits, group_size, torch.float16, config=SPLIT, split=2)


@pytest.mark.parametrize("bits,group_size,block_k", [(2, 64, 32), (3, 128, 32), (8, 32, 64), (4, 32, 128)])
def test_tiled_gemm(bits, group_size, block_k):
    # several K tiles: BLOCK_K = 32 inside a group of 64/128 (the group index is k0 // g), two or four groups of
    # 32 in a tile of 64/128 (group indices k0 // g + j); K = 203 leaves a ragged last tile and a partial group
    check(40, 36, 203, bits, group_size, torch.float16, config={**GEMM, "BLOCK_K": block_k})


def test_quantized_layer_bf16():
    # the tensors the quantizer writes (fitted scales and offsets), a 3-D activation
    from qtune.formats import AffineConfig
    from qtune.nn import LinearAffine

    layer = LinearAffine.from_float(torch.nn.Linear(150, 33), AffineConfig(bits=3, group_size=64, iters=2))
    w = layer.weight_args()
    w32 = reference_dequantize(*w, torch.float32)
    x = activations(6, 150, torch.bfloat16).view(2, 3, 150)
    assert_product_close(linear_affine(x, *w, None), x, w32.t(), None, "layer forward")
    dy = activations(6, 33, torch.bfloat16, seed=3).view(2, 3, 33)
    assert_product_close(linear_affine_grad_input(dy, *w), dy, w32, None, "layer backward")


@pytest.mark.parametrize("m", [2, 20])
def test_routing_wrappers(m):
    """The wrappers registered for ``qtune::linear_affine`` on CUDA: the forward picks by M (fused ≤ 16,
    dequantize + matmul above), the input gradient re-dequantizes from the packed tensors (dequantize + matmul
    by default; fused when forced)."""
    w = affine_weight(24, 100, 3, 32)
    w32 = reference_dequantize(*w, torch.float32)
    x = activations(m, 100, torch.float16)
    dy = activations(m, 24, torch.float16, seed=3)
    with dispatch.record() as log:
        y = routing.linear_affine(x, *w, None)
        dx = routing.linear_affine_grad_input(dy, *w)
        with dispatch.force("fused"):
            dx_fused = routing.linear_affine_grad_input(dy, *w)
    assert log == [("affine", "forward", m, "fused" if m <= 16 else "dequant"),
                   ("affine", "grad_input", m, "dequant"), ("affine", "grad_input", m, "fused")]
    assert_product_close(y, x, w32.t(), None, "forward")
    assert_product_close(dx, dy, w32, None, "grad_input")
    assert_product_close(dx_fused, dy, w32, None, "grad_input fused")


def test_validation():
    w = affine_weight(8, 96, 4, 32)
    with pytest.raises(ValueError, match="features"):
        linear_affine(activations(2, 64, torch.float16), *w, None)
    with pytest.raises(ValueError, match="rows"):
        linear_affine_grad_input(activations(2, 9, torch.float16), *w)
    with pytest.raises(ValueError, match="bytes per row"):
        linear_affine(activations(2, 96, torch.float16), w[0][:, :-1], *w[1:], None)
    with pytest.raises(ValueError, match="scale"):
        linear_affine(activations(2, 96, torch.float16), w[0], w[1][:, :2], *w[2:], None)
    with pytest.raises(ValueError, match="bits=5"):
        linear_affine(activations(2, 96, torch.float16), w[0], w[1], w[2], 5, 32, 96, None)
    with pytest.raises(ValueError, match="BLOCK_K=16"):
        linear_affine(activations(2, 96, torch.float16), *w, None, config={**SPLIT, "BLOCK_K": 16})


@pytest.mark.parametrize("k,bits,odd", [(256, 4, False), (77, 4, True), (384, 3, False), (200, 3, True)])
def test_packed_rows_not_16_byte_aligned_pick_the_odd_k_configs(monkeypatch, k, bits, odd):
    # on a GPU the autotuner launches: the config list is chosen from the packed row width (the 16-byte-aligned
    # tiles spill when the code bytes cannot move in 16-byte transactions); here the launch is intercepted
    from qtune.kernels import matmul_affine

    picked = []
    monkeypatch.setattr(matmul_affine, "fixed_config", lambda *a: None)
    monkeypatch.setattr(matmul_affine, "launch", lambda fn, tuner, *a: picked.append(tuner))
    w = affine_weight(8, k, bits, 32)
    linear_affine(activations(40, k, torch.float16), *w, None)
    linear_affine_grad_input(activations(40, 8, torch.float16), *w)
    suffix = "_odd_k" if odd else ""
    assert picked == [matmul_affine._TUNERS["fwd" + suffix], matmul_affine._TUNERS["bwd" + suffix]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_every_bits_and_group_size_larger(bits, group_size):
    # every code width × every group size, bf16, at a larger ragged shape (~1 s each): K = 517 is three
    # interpreter tiles (BLOCK_K = 256), a partial last group, a last run of 5 codes (K mod 8); N = 130 (a
    # partial N tile of 256), M = 33 (a partial M tile of 64)
    check(33, 130, 517, bits, group_size, torch.bfloat16, seed=10 * bits + group_size)
