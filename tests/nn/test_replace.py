"""The model pass on transformers models (Llama: nn.Linear; GPT-2: Conv1D)."""
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
