"""8-bit formats: bitsandbytes-identical absmax layout, zero-point bounds, LLM.int8 decomposition."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtune import hardware
from qtune.formats.int8 import (FP32_EXACT_CHUNK, Int8Config, LLMInt8Config, dequantize_int8, int8_matmul,
                                int8_matmul_fp32_chunks, llm_int8_linear, quantize_int8)

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


def _extreme_int8(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    a[0], a[1] = -128, 127          # rows of extremes: sums of 128² and 127·128 products
    a[2, ::2] = -128                # alternating extremes
    return a


@pytest.mark.parametrize("method", ["int_mm", "fp32"])
@pytest.mark.parametrize("m,k,n", [(32, 1, 8), (32, 1023, 16), (24, 1024, 40), (40, 1025, 24), (33, 3000, 20),
                                   (5, 7, 3)])
def test_int8_matmul_paths_equal_int_mm_bit_for_bit(method, m, k, n):
    """Both paths equal the int64 product (and so each other), K not a multiple of the chunk included."""
    a, b = _extreme_int8(m, k, 0), _extreme_int8(n, k, 1)
    b[0] = -128  # (-128)·(-128) row × column: the largest products, 2¹⁴ each
    exact = (a.long() @ b.long().t()).to(torch.int32)
    assert torch.equal(int8_matmul(a, b, method=method), exact)
    if k % 8 == 0 and m > 16 and n % 8 == 0:
        assert torch.equal(torch._int_mm(a, b.t()), exact)


def test_fp32_chunks_are_needed_and_bounded():
    """One fp32 matmul over K = 2048 cannot hold an odd sum above 2²⁴; the 1024-chunks can."""
    a = torch.full((1, 2048), 127, dtype=torch.int8)
    b = torch.full((1, 2048), 127, dtype=torch.int8)
    b[0, 0] = 1
    exact = 127 * 127 * 2047 + 127  # odd and > 2²⁴: not an fp32 number
    assert int((a.float() @ b.float().t()).item()) != exact
    assert int(int8_matmul_fp32_chunks(a, b).item()) == exact
    assert int(int8_matmul(a, b, method="fp32").item()) == exact
    with pytest.raises(ValueError, match="chunk=1025"):
        int8_matmul_fp32_chunks(a, b, chunk=FP32_EXACT_CHUNK + 1)
    with pytest.raises(ValueError, match="method='fp16'"):
        int8_matmul(a, b, method="fp16")


def test_fp32_single_matmul_only_when_cauchy_schwarz_proves_it_exact(monkeypatch):
    """absmax-quantized Gaussian rows (‖·‖ ≈ 2,000 at K = 4096) take one fp32 matmul; extreme rows whose
    norms break the 2²⁴ bound take the 1024-chunks; both equal the int64 product."""
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **kw: calls.append(1) or mm(*a, **kw))
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(48, 4096, generator=g), torch.randn(40, 4096, generator=g)
    a = torch.round(x * (127 / x.abs().amax(1, keepdim=True))).to(torch.int8)
    b = quantize_int8(w, LLMInt8Config()).weight
    assert torch.equal(int8_matmul_fp32_chunks(a, b), (a.long() @ b.long().t()).int())
    assert len(calls) == 1
    calls.clear()
    a[0], b[0] = 127, 127  # ‖a_0‖·‖b_0‖ = 127²·4096 = 2²⁶ > 2²⁴
    assert torch.equal(int8_matmul_fp32_chunks(a, b), (a.long() @ b.long().t()).int())
    assert len(calls) == 4


def test_int8_matmul_follows_the_machine_choice(monkeypatch):
    """``method=None`` takes :func:`qtune.hardware.int8_matmul_method`'s choice (forced here by env)."""
    calls = []
    real = int8_matmul_fp32_chunks
    monkeypatch.setattr("qtune.formats.int8.int8_matmul_fp32_chunks", lambda a, b: calls.append(1) or real(a, b))
    a, b = _extreme_int8(32, 64, 2), _extreme_int8(16, 64, 3)
    monkeypatch.setenv("QTUNE_INT8_MATMUL", "fp32")
    assert hardware.int8_matmul_method("cpu") == ("fp32", "forced by QTUNE_INT8_MATMUL=fp32")
    out = int8_matmul(a, b)
    assert calls == [1]
    monkeypatch.setenv("QTUNE_INT8_MATMUL", "int_mm")
    assert torch.equal(int8_matmul(a, b), out) and calls == [1]
    monkeypatch.setenv("QTUNE_INT8_MATMUL", "fp64")
    with pytest.raises(ValueError, match="QTUNE_INT8_MATMUL='fp64'"):
        int8_matmul(a, b)


def test_int8_matmul_method_without_vnni_is_fp32_without_probing(monkeypatch):
    """An AVX2-only CPU (flags as torch reports them) or oneDNN capped at AVX2: fp32 chunks, no probe."""
    monkeypatch.delenv("QTUNE_INT8_MATMUL", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(hardware, "probe_int8_matmul", lambda *a, **k: pytest.fail("probed"))
    hardware._cpu_int8_method.cache_clear()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"architecture": "x86_64", "avx2": True, "avx512_vnni": False})
    method, reason = hardware._cpu_int8_method("avx2-box")
    assert method == "fp32" and "no AVX512-VNNI" in reason
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"architecture": "x86_64", "avx512_vnni": True})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    method, reason = hardware._cpu_int8_method("onednn-capped")
    assert method == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX2" in reason
    hardware._cpu_int8_method.cache_clear()


@pytest.mark.parametrize("probe, method", [({"int_mm_exact": True, "int_mm_s": 1.0, "fp32_s": 3.0}, "int_mm"),
                                           ({"int_mm_exact": True, "int_mm_s": 3.0, "fp32_s": 1.0}, "fp32"),
                                           ({"int_mm_exact": False, "int_mm_s": 1.0, "fp32_s": 3.0}, "fp32")])
def test_int8_matmul_method_probe_decides_and_is_cached(monkeypatch, tmp_path, probe, method):
    monkeypatch.delenv("QTUNE_INT8_MATMUL", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"architecture": "x86_64", "avx512_vnni": True})
    calls = []
    monkeypatch.setattr(hardware, "probe_int8_matmul", lambda *a, **k: calls.append(1) or dict(probe))
    hardware._cpu_int8_method.cache_clear()
    assert hardware._cpu_int8_method("k")[0] == method
    hardware._cpu_int8_method.cache_clear()  # a new process: reads the file, does not time again
    assert hardware._cpu_int8_method("k")[0] == method and calls == [1]
    hardware._cpu_int8_method.cache_clear()


def test_probe_int8_matmul_runs():
    r = hardware.probe_int8_matmul(shape=(32, 2048, 16), repeat=1)
    assert r["int_mm_s"] > 0 and r["fp32_s"] > 0 and isinstance(r["int_mm_exact"], bool)


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


def _bnb_layer(k, n, threshold, dtype, seed=0):
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    lin = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=threshold)
    lin.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    lin.bias.data = torch.randn(n, generator=g).to(dtype)
    return lin.to("cpu").eval()


@pytest.mark.parametrize("method", ["int_mm", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_llm_int8_bitsandbytes_arithmetic_equals_bitsandbytes_bit_for_bit(monkeypatch, method, dtype, threshold):
    """``arithmetic="bitsandbytes"`` reproduces bitsandbytes 0.50's eval forward exactly, with outlier
    columns, an outlier in a single element, a row that is all outliers, and values that round
    differently in fp16; under either exact int8 matmul path and with the native epilogue op."""
    import qtune.ops  # noqa: F401  (registers torch.ops.qtune.int8_mm_dequant)

    monkeypatch.setenv("QTUNE_INT8_MATMUL", method)
    k, n = 1100, 72  # K above one fp32 chunk
    lin = _bnb_layer(k, n, threshold, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, k, generator=g)
    x[..., [5, 700]] *= 30.0     # outlier feature columns
    x[1, 3, 9] = -7.0            # a single outlier element
    x[2, 4, :] = 8.0             # a row of outliers only (its int8 part is all zero)
    x = (x * (1 + 2.0 ** -13)).to(dtype)  # fp32 values between fp16 numbers
    with torch.no_grad():
        y_bnb = lin(x)
    cb, scb = lin.state.CB, lin.state.SCB
    for mm_dequant in (None, torch.ops.qtune.int8_mm_dequant):
        kw = {} if mm_dequant is None else {"mm_dequant": mm_dequant}
        y = llm_int8_linear(x, cb, scb, threshold, lin.bias.data, arithmetic="bitsandbytes", **kw)
        assert y.dtype == y_bnb.dtype == dtype
        assert torch.equal(y, y_bnb), f"max |Δ| {float((y.float() - y_bnb.float()).abs().max())}"
    if dtype == torch.float32 and threshold > 0:  # qtune's own arithmetic is close, not equal
        y_q = llm_int8_linear(x, cb, scb, threshold, lin.bias.data)
        assert not torch.equal(y_q, y_bnb)
        torch.testing.assert_close(y_q, y_bnb, rtol=2e-2, atol=2e-2)


def test_bitsandbytes_checkpoint_layers_compute_bitsandbytes_forward(tmp_path):
    """A tiny Llama quantized by bitsandbytes itself (``load_in_8bit``, threshold 6.0, outlier features
    injected through the norms), saved, and read by ``qtune.load_model``: every int8 layer is read with
    ``arithmetic="bitsandbytes"`` and, on the very inputs bitsandbytes' eval forward saw, computes
    bitsandbytes' outputs bit for bit (tolerance 0: the same operations in the same order)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    import qtune
    from qtune.nn import LinearLLMInt8

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # outlier features (LLM.int8 §3) in every layer's inputs
            layer.input_layernorm.weight[[3, 17]] = 25.0
            layer.post_attention_layernorm.weight[[5]] = -30.0
    model.save_pretrained(tmp_path / "float")
    bnb_model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)).eval()
    bnb_model.save_pretrained(tmp_path / "bnb8")
    q = qtune.load_model(tmp_path / "bnb8")
    layers = {n: m for n, m in q.named_modules() if isinstance(m, LinearLLMInt8)}
    assert len(layers) == 14 and all(m.config.arithmetic == "bitsandbytes" for m in layers.values())

    seen = {}
    hooks = [bnb_model.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0].detach().clone(), out.detach().clone())))
        for n in layers]
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bnb_model(ids)
    for h in hooks:
        h.remove()
    outliers = 0
    for name, m in layers.items():
        x, y_bnb = seen[name]
        outliers += int((x.abs() >= 6.0).any(dim=-2).sum())
        assert torch.equal(m.weight, bnb_model.get_submodule(name).weight.data)
        with torch.no_grad():
            y = m(x)  # the layer's own forward: qtune::linear_llm_int8_bnb
        assert torch.equal(y, y_bnb), f"{name}: max |Δ| {float((y - y_bnb).abs().max())}"
    assert outliers > 0, "the test must exercise the outlier decomposition"
    # and the whole model: qtune's logits are bitsandbytes' logits
    with torch.no_grad():
        logits_bnb, logits_q = bnb_model(ids).logits, q.eval()(ids).logits
    assert torch.equal(logits_q, logits_bnb), float((logits_q - logits_bnb).abs().max())
    # backward runs (LLM.int8's dx = dy·CB·SCB/127) and reaches the input
    x = seen["model.layers.0.mlp.down_proj"][0].clone().requires_grad_(True)
    layers["model.layers.0.mlp.down_proj"](x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_config():
    with pytest.raises(ValueError, match="arithmetic='bnb'"):
        LLMInt8Config(arithmetic="bnb")
    assert LLMInt8Config(arithmetic="bitsandbytes").to_dict()["arithmetic"] == "bitsandbytes"
    with pytest.raises(ValueError, match="group_size=1"):
        Int8Config(group_size=1)
    with pytest.raises(ValueError, match="threshold"):
        LLMInt8Config(threshold=-1.0)
    with pytest.raises(ValueError, match="down_proj.*NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]), Int8Config(), name="down_proj")
