"""The model pass on transformers models (Llama: nn.Linear; GPT-2: Conv1D)."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from qtune.formats import Int8Config, NF4Config
from qtune.nn import Linear4bit, LinearInt8, QuantLinear, quantize_model


def tiny_llama():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_llama_all_linear_but_head_with_overrides():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 11))
    ref = model(ids).logits
    report = quantize_model(model, NF4Config(), overrides={"down_proj": Int8Config()})
    names = {n: type(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(names) == 2 * 7
    assert all(t is LinearInt8 for n, t in names.items() if n.endswith("down_proj"))
    assert all(t is Linear4bit for n, t in names.items() if not n.endswith("down_proj"))
    assert isinstance(model.lm_head, torch.nn.Linear) and report.skipped == ["lm_head"]
    assert report.bytes_after < report.bytes_before / 3
    assert 4.0 < report.bits_per_param < 8.5
    assert "14 layers quantized" in report.summary()
    out = model(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().mean() < 0.2 * ref.abs().mean() + 0.05


def test_gpt2_conv1d_is_found_and_equivalent():
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 128, (1, 9))
    ref = model(ids).logits
    report = quantize_model(model, Int8Config())
    assert len(report.layers) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert all(isinstance(model.get_submodule(r.name), LinearInt8) for r in report.layers)
    torch.testing.assert_close(model(ids).logits, ref, rtol=0.05, atol=0.05)


def test_override_none_skips_and_glob_patterns():
    model = tiny_llama()
    report = quantize_model(model, NF4Config(), skip_modules=("lm_head", "*.layers.0.*"),
                            overrides={"o_proj": None})
    assert all(".layers.1." in r.name for r in report.layers)
    assert not any(r.name.endswith("o_proj") for r in report.layers)


# -- the layer plan, dequantize_model, the public layer interface -------------------------------------------
def test_layer_plan_says_what_is_skipped_and_why():
    from qtune.nn import DEFAULT_SKIP, LayerPlan, plan_layers

    model = tiny_llama()
    model.config.tie_word_embeddings = False
    plan = plan_layers(model, NF4Config(), overrides={"down_proj": None, "up_proj": Int8Config()})
    assert isinstance(plan, LayerPlan) and DEFAULT_SKIP == ("lm_head",)
    assert plan.skipped["lm_head"] == "skip_modules pattern 'lm_head'"
    assert plan.skipped["model.layers.0.mlp.down_proj"] == "override None"
    assert plan["model.layers.1.mlp.up_proj"] == Int8Config() and len(plan) == 2 * 6
    assert list(plan) == [n for n, _ in model.named_modules() if n in plan]  # module order
    assert plan_layers(model, None).configs == {} and len(plan_layers(model, None).skipped) == 2 * 7 + 1
    explicit = plan_layers(model, None, layers={"model.layers.0.self_attn.q_proj": NF4Config()})
    assert list(explicit) == ["model.layers.0.self_attn.q_proj"]
    assert explicit.skipped["lm_head"] == "not in the explicit layers map"
    with pytest.raises(ValueError, match="model.nope"):
        plan_layers(model, None, layers={"model.nope": NF4Config()})


def test_quantize_model_applies_a_given_plan_and_dequantize_model_undoes_the_swap():
    from qtune.nn import dequantize_model, plan_layers

    model = tiny_llama()
    plan = plan_layers(model, Int8Config(), skip_modules=("lm_head", "k_proj"))
    report = quantize_model(model, None, plan=plan)
    assert [r.name for r in report.layers] == list(plan) and "model.layers.0.self_attn.k_proj" in report.skipped
    dense = {n: m.dequantize(torch.float32) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert dequantize_model(model) is model
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    for n, w in dense.items():
        layer = model.get_submodule(n)
        assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, w)


def test_to_dense_keeps_conv1d_and_bias():
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = GPT2LMHeadModel(cfg).eval()
    quantize_model(model, Int8Config())
    layer = model.transformer.h[0].attn.c_attn
    dense = layer.to_dense(torch.float32)
    assert type(dense).__name__ == "Conv1D" and torch.equal(dense.weight, layer.dequantize(torch.float32).t())
    assert torch.equal(dense.bias, layer.bias.float())


def test_requantize_keeps_buffer_dtypes_and_gptq_stays_on_its_grid():
    from qtune.nn import Linear4bit, LinearGPTQ
    from qtune.formats import RTNConfig

    lin = torch.nn.Linear(64, 32)
    nf4 = Linear4bit.from_float(lin, NF4Config(double_quant=True))
    dtypes = {k: b.dtype for k, b in nf4.named_buffers()}
    new = lin.weight.detach() * 0.5
    assert nf4.requantize_(new) == 0
    assert {k: b.dtype for k, b in nf4.named_buffers()} == dtypes
    assert (nf4.dequantize(torch.float32) - new).abs().max() < 0.05
    gptq = LinearGPTQ.from_float(lin, RTNConfig(bits=4, group_size=32))
    scales = gptq.scales.clone()
    clamped = gptq.requantize_(lin.weight.detach() * 3)  # far off the grid: codes clamp, scales stay
    assert clamped > 0 and torch.equal(gptq.scales, scales)
    with pytest.raises(ValueError, match="expected \\(32, 64\\)"):
        gptq.requantize_(torch.zeros(64, 32))


def test_code_tables_are_never_shared_between_layers():
    from qtune.formats import nf4 as nf4_format
    from qtune.nn import Linear4bit

    a, b = (Linear4bit.from_float(torch.nn.Linear(64, 32), NF4Config(double_quant=True)) for _ in range(2))
    for name in ("quant_map", "nested_quant_map"):
        assert getattr(a, name).data_ptr() != getattr(b, name).data_ptr()
    assert nf4_format.code_table("nf4") is not nf4_format.code_table("nf4")
    assert nf4_format.dynamic_map() is not nf4_format.dynamic_map()
