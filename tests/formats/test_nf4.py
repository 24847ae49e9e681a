"""NF4/FP4 reference: round-trip bounds and byte-identity with bitsandbytes."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtune.formats import nf4
from qtune.formats.nf4 import FP4Config, NF4Config, dequantize_4bit, quantize_4bit

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency (pip install -e .[dev])")
import bitsandbytes.functional as BF  # noqa: E402

CONFIGS = [NF4Config, FP4Config]


def _deq(t):
    return dequantize_4bit(t.packed, t.absmax, t.code, t.blocksize, t.shape, nested_absmax=t.nested_absmax,
                           nested_code=t.nested_code, nested_offset=t.nested_offset)


def _bnb_default(op_name, *args):
    # bitsandbytes' own pure-PyTorch ("default") kernel — its reference implementation
    op = getattr(torch.ops.bitsandbytes, op_name).default
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), *args)


def test_code_tables_match_bitsandbytes():
    assert torch.equal(nf4.code_table("nf4"), BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.code_table("fp4"), BF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), BF.create_dynamic_map())


@pytest.mark.parametrize("cfg_cls", CONFIGS)
@pytest.mark.parametrize("shape,blocksize", [((256, 512), 64), ((33, 77), 64), ((96, 576), 128), ((300, 1000), 4096), ((64, 64), 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_bytes_identical_to_bitsandbytes(cfg_cls, shape, blocksize, dtype):
    w = (torch.randn(shape) * 0.02).to(dtype)
    t = quantize_4bit(w, cfg_cls(blocksize=blocksize))
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=cfg_cls.format)
    assert torch.equal(t.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(t.absmax, state.absmax)
    assert t.packed.shape == nf4.packed_layout(shape, blocksize)
    # dequantization equals bitsandbytes' reference kernel exactly
    ref = _bnb_default("dequantize_4bit", packed, state.absmax, blocksize, cfg_cls.format, list(shape), torch.float32)
    assert torch.equal(_deq(t), ref)


@pytest.mark.parametrize("cfg_cls", CONFIGS)
@pytest.mark.parametrize("shape,blocksize", [((256, 512), 64), ((33, 77), 64), ((96, 576), 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_quantizer_bytes_identical_to_bitsandbytes(cfg_cls, shape, blocksize, dtype, monkeypatch):
    """The path layers use (``Linear4bit.from_float`` → ``qtune::quantize_blocks_4bit`` → native C kernel on CPU)
    writes bitsandbytes' bytes and absmax for fp32, fp16 and bf16 weights."""
    from torch import nn

    from qtune.nn import Linear4bit
    from qtune.ops import cpu_native

    lib = cpu_native.library()
    if lib is None:
        pytest.skip("native CPU kernels not built (no C compiler or QTUNE_NATIVE_CPU=0): layers use the reference")
    calls = []
    native = lib.qt_quant_4bit
    monkeypatch.setattr(lib, "qt_quant_4bit", lambda *a: calls.append(a[1]) or native(*a))
    w = (torch.randn(shape) * 0.02).to(dtype)
    w[0, :blocksize // 2] = 0.0  # zeros inside a block, and a pad nibble for odd shapes
    dense = nn.Linear(shape[1], shape[0], bias=False, dtype=dtype)
    dense.weight.data = w
    layer = Linear4bit.from_float(dense, cfg_cls(blocksize=blocksize))
    assert calls == [w.numel()], "Linear4bit.from_float did not run the native C quantizer"
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=cfg_cls.format)
    assert torch.equal(layer.weight.reshape(-1), packed.reshape(-1))
    assert layer.absmax.dtype == state.absmax.dtype and torch.equal(layer.absmax, state.absmax)
    assert torch.equal(layer.quant_map, state.code)


@pytest.mark.parametrize("cfg_cls", CONFIGS)
@pytest.mark.parametrize("shape", [(256, 512), (40, 100)])
def test_double_quant_identical_to_bitsandbytes_reference(cfg_cls, shape):
    w = torch.randn(shape) * 0.02
    t = quantize_4bit(w, cfg_cls(double_quant=True))
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type=cfg_cls.format, compress_statistics=True)
    assert torch.equal(t.packed.reshape(-1), packed.reshape(-1))
    assert float(t.nested_offset) == float(state.offset)
    # bitsandbytes' CPU build quantizes the absmax with a native search that sometimes picks a
    # farther code near ties; its reference (default) kernel is exact nearest, and so is qtune
    _, plain = BF.quantize_4bit(w, blocksize=64, quant_type=cfg_cls.format)
    q_ref, nested_ref = _bnb_default("quantize_blockwise", plain.absmax - plain.absmax.mean(), nf4.dynamic_map(), 256)
    assert torch.equal(t.absmax, q_ref)
    assert torch.equal(t.nested_absmax, nested_ref)
    assert torch.equal(t.nested_absmax, state.state2.absmax)
    # where the native CPU path differs, qtune's code is strictly nearer
    code = nf4.dynamic_map()
    normed = ((plain.absmax - t.nested_offset).view(-1) / t.nested_absmax.repeat_interleave(256)[: t.absmax.numel()])
    diff = (t.absmax != state.absmax).nonzero().view(-1)
    for i in diff.tolist():
        assert (normed[i] - code[t.absmax[i].long()]).abs() <= (normed[i] - code[state.absmax[i].long()]).abs()
    assert diff.numel() <= max(2, t.absmax.numel() // 100)


@pytest.mark.parametrize("cfg_cls", CONFIGS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_bound(cfg_cls, double_quant):
    w = torch.randn(128, 256)
    t = quantize_4bit(w, cfg_cls(blocksize=64, double_quant=double_quant))
    err = (_deq(t) - w).abs().view(-1, 64)
    absmax = w.abs().view(-1, 64).amax(-1, keepdim=True)
    # half the largest gap between neighbouring code entries, relative to the block absmax
    code = nf4.code_table(cfg_cls.format).sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    slack = 0.02 if double_quant else 1e-6  # 8-bit absmax adds ≲1% relative error
    assert bool((err <= absmax * (half_gap + slack) + 1e-6).all())


def test_dequantize_dtypes_are_the_fp32_result_cast():
    w = torch.randn(64, 128)
    t = quantize_4bit(w, NF4Config())
    ref = _deq(t)
    for dtype in (torch.float16, torch.bfloat16):
        out = dequantize_4bit(t.packed, t.absmax, t.code, 64, t.shape, dtype)
        assert out.dtype == dtype and torch.equal(out, ref.to(dtype))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 130), bs=st.sampled_from([32, 64, 128]), dq=st.booleans())
def test_any_shape_round_trips(n, k, bs, dq):
    w = torch.randn(n, k)
    t = quantize_4bit(w, NF4Config(blocksize=bs, double_quant=dq))
    assert t.absmax.numel() == math.ceil(n * k / bs)
    out = _deq(t)
    assert out.shape == (n, k)
    assert float((out - w).abs().max()) <= float(w.abs().max()) * 0.2 + 1e-6


def test_bad_input():
    with pytest.raises(ValueError, match="blocksize=48"):
        NF4Config(blocksize=48)
    w = torch.randn(8, 64)
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.q_proj.*NaN"):
        quantize_4bit(w, NF4Config(), name="model.layers.0.q_proj")
    with pytest.raises(ValueError, match="Inf"):
        quantize_4bit(torch.full((4, 64), float("inf")), NF4Config())
    with pytest.raises(TypeError, match="int64"):
        quantize_4bit(torch.ones(4, 64, dtype=torch.int64), NF4Config())
    with pytest.raises(ValueError, match="2-D"):
        quantize_4bit(torch.ones(64), NF4Config())
    with pytest.raises(ValueError, match="compute_dtype"):
        NF4Config(compute_dtype="float8")
