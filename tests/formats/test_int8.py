"""8-bit formats: bitsandbytes-identical absmax layout, zero-point bounds, LLM.int8 decomposition."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtune.formats.int8 import Int8Config, LLMInt8Config, dequantize_int8, int8_matmul, llm_int8_linear, quantize_int8

VARIANTS = [Int8Config(), Int8Config(group_size=32), Int8Config(symmetric=False), Int8Config(symmetric=False, group_size=48)]


def test_absmax_per_row_is_bitsandbytes_layout():
    BF = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(96, 200) * 0.05).half()
    t = quantize_int8(w, LLMInt8Config())
    cb, scb, _ = BF.int8_vectorwise_quant(w)
    assert t.weight.dtype == torch.int8 and torch.equal(t.weight, cb)
    assert torch.equal(t.scale[:, 0], scb)


@pytest.mark.parametrize("cfg", VARIANTS, ids=str)
def test_round_trip_within_half_step(cfg):
    w = torch.randn(64, 200)
    w[3] = 0.0          # an all-zero row stays exactly zero
    w[5] = w[5].abs()   # an all-positive row
    t = quantize_int8(w, cfg)
    out = dequantize_int8(t.weight, t.scale, t.zero, t.group_size)
    g = 200 if cfg.group_size == -1 else cfg.group_size
    idx = torch.arange(200) // g
    step = (t.scale / 127.0 if cfg.symmetric else t.scale)[:, idx]
    assert bool(((out - w).abs() <= step / 2 + 1e-6).all())
    assert bool((out[3] == 0).all())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), k=st.integers(1, 100), g=st.sampled_from([-1, 2, 7, 32]), sym=st.booleans())
def test_any_shape(n, k, g, sym):
    w = torch.randn(n, k)
    t = quantize_int8(w, Int8Config(symmetric=sym, group_size=g))
    out = dequantize_int8(t.weight, t.scale, t.zero, t.group_size)
    assert out.shape == (n, k)
    assert float((out - w).abs().max()) <= float(w.abs().max()) / 100 + 1e-6


def test_int8_matmul_exact():
    a = torch.randint(-127, 128, (33, 96), dtype=torch.int8)
    b = torch.randint(-127, 128, (40, 96), dtype=torch.int8)
    assert torch.equal(int8_matmul(a, b), a.long() @ b.long().t())
    a = torch.randint(-127, 128, (5, 7), dtype=torch.int8)  # shapes torch._int_mm rejects
    b = torch.randint(-127, 128, (3, 7), dtype=torch.int8)
    assert torch.equal(int8_matmul(a, b), (a.long() @ b.long().t()).int())


def test_llm_int8_beats_plain_int8_on_outlier_features():
    w = torch.randn(128, 256) * 0.05
    x = torch.randn(64, 256)
    x[:, [3, 77, 200]] *= 40.0  # systematic outlier features, as in LLM.int8 §3
    t = quantize_int8(w, LLMInt8Config())
    ref = x @ w.t()
    mixed = llm_int8_linear(x, t.weight, t.scale[:, 0], 6.0)
    plain = llm_int8_linear(x, t.weight, t.scale[:, 0], 0.0)
    err_mixed, err_plain = (mixed - ref).norm(), (plain - ref).norm()
    assert err_mixed < 0.5 * err_plain


def test_llm_int8_matches_bitsandbytes_in_eval():
    bnb = pytest.importorskip("bitsandbytes")
    k, n = 256, 128
    w = torch.randn(n, k) * 0.05
    lin = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=6.0)
    lin.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    lin.bias.data = torch.randn(n).half()
    lin = lin.to("cpu").eval()
    x = torch.randn(16, k).half()
    x[:, 5] *= 30
    with torch.no_grad():
        y_bnb = lin(x)
    t = quantize_int8(w.half(), LLMInt8Config())
    y = llm_int8_linear(x, t.weight, t.scale[:, 0], 6.0, lin.bias.data)
    assert y.dtype == torch.float16
    # same codes and maths; bitsandbytes scales by 6.200124e-05 (≈1/127², off by 2e-5 relative)
    torch.testing.assert_close(y.float(), y_bnb.float(), rtol=2e-3, atol=4e-3)


def test_bad_config():
    with pytest.raises(ValueError, match="group_size=1"):
        Int8Config(group_size=1)
    with pytest.raises(ValueError, match="threshold"):
        LLMInt8Config(threshold=-1.0)
    with pytest.raises(ValueError, match="down_proj.*NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]), Int8Config(), name="down_proj")
