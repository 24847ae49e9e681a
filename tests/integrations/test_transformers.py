"""qtune as a transformers quantization method: quantize on load, save, reload, footprint, flags."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from qtune import LLMInt8Config, NF4Config, quantize_model
from qtune.integrations import QTuneConfig, mark_quantized
from qtune.nn import Linear4bit, LinearGPTQ, LinearInt8, LinearLLMInt8, QuantLinear
from tests.integrations.tiny_models import ARCHS, tokens

# (format, options, layer class)
FORMATS = {
    "nf4-dq-bf16": (dict(format="nf4", double_quant=True, compute_dtype="bfloat16"), Linear4bit),
    "fp4": (dict(format="fp4"), Linear4bit),
    "int8": (dict(format="int8"), LinearInt8),
    "llm_int8": (dict(format="llm_int8"), LinearLLMInt8),
    "rtn3-g32": (dict(format="rtn", bits=3, group_size=32), LinearGPTQ),
}


def logits(model, x=None):
    with torch.no_grad():
        return model(tokens() if x is None else x).logits


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def linear_count(model):
    from qtune.nn import linear_modules

    return len(linear_modules(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_on_load_save_reload_identical(arch, tiny_path, tmp_path):
    path = tiny_path(arch)
    ref = AutoModelForCausalLM.from_pretrained(path)
    q = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=QTuneConfig(format="nf4", double_quant=True, compute_dtype="bfloat16"))
    layers = quant_layers(q)
    # every linear layer but the output embeddings is quantized
    assert layers and linear_count(q) == 1  # only the output embeddings (lm_head / embed_out) stay float
    assert all(isinstance(m, Linear4bit) and m.compute_dtype == torch.bfloat16 for m in layers.values())
    if arch == "gpt2":
        assert all(m.from_conv1d for m in layers.values())
    # quantize-on-load is quantize_model on the float model: the same bytes, hence the same logits bit for bit
    from qtune.integrations.transformers import unquantizable_modules

    direct = AutoModelForCausalLM.from_pretrained(path)
    quantize_model(direct, NF4Config(double_quant=True, compute_dtype="bfloat16"),
                   skip_modules=unquantizable_modules(direct))
    assert set(quant_layers(direct)) == set(layers)
    for n, m in quant_layers(direct).items():
        for k, v in m.state_dict().items():
            got = layers[n].state_dict()[k]
            assert got.dtype == v.dtype and torch.equal(got, v), f"{n}.{k}"
    b = logits(q)
    assert torch.equal(b, logits(direct))
    assert not torch.equal(b, logits(ref))  # and it is quantized
    q.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qtune" and cfg["format"] == "nf4" and cfg["double_quant"] is True
    r, info = AutoModelForCausalLM.from_pretrained(tmp_path / "q", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(quant_layers(r)) == set(layers)
    assert torch.equal(logits(r), b)
    for n, m in quant_layers(r).items():  # restored, not re-quantized: the very same bytes
        assert torch.equal(m.weight, layers[n].weight) and torch.equal(m.absmax, layers[n].absmax)


@pytest.mark.parametrize("key", list(FORMATS))
def test_formats_reload_identical_and_flags(key, tiny_path, tmp_path):
    opts, cls = FORMATS[key]
    path = tiny_path("qwen2")  # q/k/v with biases
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=QTuneConfig(**opts))
    assert all(type(m) is cls for m in quant_layers(q).values())
    bits = opts.get("bits", 4 if opts["format"] in ("nf4", "fp4") else 8)
    assert q.is_quantized and q.quantization_method == "qtune"
    assert q.is_loaded_in_4bit == (bits <= 4) and q.is_loaded_in_8bit == (bits > 4)
    assert q.hf_quantizer.is_trainable and q.hf_quantizer.is_serializable()
    for m in quant_layers(q).values():
        assert all(not b.requires_grad for b in m.buffers())
        assert m.bias is None or (not m.bias.requires_grad and m.bias.dtype == m.compute_dtype)
    q.save_pretrained(tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(r), logits(q))


@pytest.mark.parametrize("key", ["int8", "llm_int8", "nf4-dq-bf16", "rtn3-g32"])
def test_bf16_load_keeps_float_buffers_in_their_own_dtype(key, tiny_path, tmp_path):
    """Loading in bf16 casts the model's float weights, never the layers' fp32 scales/absmax (nor on reload)."""
    opts, _ = FORMATS[key]
    q = AutoModelForCausalLM.from_pretrained(tiny_path("llama"), dtype=torch.bfloat16, quantization_config=QTuneConfig(**opts))
    layers = quant_layers(q)
    expected = {f"{n}.{b}": t.dtype for n, m in layers.items() for b, t in m.named_buffers(recurse=False)}
    assert any(d == torch.float32 for d in expected.values()) or key == "rtn3-g32"
    q.save_pretrained(tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    got = {f"{n}.{b}": t.dtype for n, m in quant_layers(r).items() for b, t in m.named_buffers(recurse=False)}
    assert got == expected
    for name, dtype in expected.items():
        if name.endswith((".scale", ".SCB", ".absmax", ".nested_absmax", ".nested_offset")) and dtype.is_floating_point:
            assert dtype == torch.float32, name
    assert torch.equal(logits(r), logits(q))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memory_footprint_matches_tensor_bytes(arch, tiny_path, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_path(arch), quantization_config=QTuneConfig("nf4", double_quant=True))
    q.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        saved = sum(f.get_tensor(k).nbytes for k in f.keys())
    non_persistent = sum(b.nbytes for n, b in q.named_buffers() if n.rsplit(".", 1)[-1] not in
                         dict(q.get_submodule(n.rpartition(".")[0]).state_dict()))
    assert q.get_memory_footprint() == saved + non_persistent
    # and the quantized layers contribute exactly their packed bytes (+ bias)
    for m in quant_layers(q).values():
        assert m.quantized_bytes() == sum(b.nbytes for b in m.buffers(recurse=False))
    f32 = AutoModelForCausalLM.from_pretrained(tiny_path(arch))
    assert q.get_memory_footprint() < f32.get_memory_footprint()


def test_skip_modules_and_overrides(tiny_path, tmp_path):
    cfg = QTuneConfig("nf4", skip_modules=["lm_head", "layers.0.self_attn.o_proj"],
                      overrides={"down_proj": LLMInt8Config(), "*.1.mlp.up_proj": None, "gate_proj": "int8"})
    q = AutoModelForCausalLM.from_pretrained(tiny_path("llama"), quantization_config=cfg)
    layers = quant_layers(q)
    assert "model.layers.0.self_attn.o_proj" not in layers and "model.layers.1.self_attn.o_proj" in layers
    assert "model.layers.1.mlp.up_proj" not in layers and "model.layers.0.mlp.up_proj" in layers
    assert isinstance(layers["model.layers.0.mlp.down_proj"], LinearLLMInt8)
    assert isinstance(layers["model.layers.1.mlp.gate_proj"], LinearInt8)
    assert q.is_loaded_in_4bit and q.is_loaded_in_8bit
    q.save_pretrained(tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert {n: type(m) for n, m in quant_layers(r).items()} == {n: type(m) for n, m in layers.items()}
    assert torch.equal(logits(r), logits(q))


def test_gpt_neox_keeps_output_embeddings_float(tiny_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_path("gpt_neox"), quantization_config=QTuneConfig("int8"))
    assert not isinstance(q.get_output_embeddings(), QuantLinear)


def test_device_map_and_dtype(tiny_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_path("mistral"), quantization_config=QTuneConfig("nf4"),
                                             device_map="cpu", dtype=torch.bfloat16)
    m = q.model.layers[0].mlp.up_proj
    assert isinstance(m, Linear4bit) and m.compute_dtype == torch.bfloat16 and m.weight.device.type == "cpu"
    assert logits(q).dtype == torch.bfloat16


def test_config_roundtrip_and_validation():
    cfg = QTuneConfig("rtn", bits=3, group_size=64, sym=False, compute_dtype=torch.bfloat16,
                      overrides={"down_proj": NF4Config(double_quant=True)})
    d = cfg.to_dict()
    assert d["quant_method"] == "qtune" and d["bits"] == 3 and d["compute_dtype"] == "bfloat16"
    back = QTuneConfig.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d
    assert back.default_config().bits == 3 and back.override_configs()["down_proj"].double_quant
    with pytest.raises(ValueError, match="quantization format 'nf5'"):
        QTuneConfig("nf5")
    with pytest.raises(ValueError, match="unknown field"):
        QTuneConfig("nf4", bits=3)
    with pytest.raises(ValueError, match="blocksize"):
        QTuneConfig("nf4", overrides={"q_proj": {"format": "nf4", "blocksize": 7}})


def test_gptq_needs_calibration_on_load(tiny_path):
    with pytest.raises(ValueError, match="needs calibration"):
        AutoModelForCausalLM.from_pretrained(tiny_path("llama"), quantization_config=QTuneConfig("gptq"))


def test_mark_quantized_makes_quantize_model_output_saveable(tiny_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path("opt"))
    quantize_model(model, NF4Config(), overrides={"fc2": LLMInt8Config()})
    cfg = mark_quantized(model)
    assert cfg.layers and model.is_loaded_in_4bit
    model.save_pretrained(tmp_path / "m")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(r.model.decoder.layers[0].fc2, LinearLLMInt8)
    assert torch.equal(logits(r), logits(model))


def test_dequantize_returns_float_model(tiny_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_path("gpt2"), quantization_config=QTuneConfig("int8"))
    expected = logits(q)
    d = q.dequantize()
    assert not quant_layers(d) and not getattr(d, "is_quantized", False)
    assert torch.allclose(logits(d), expected, atol=1e-5)


def test_peft_prepare_model_for_kbit_training_sees_a_quantized_model(tiny_path):
    from peft import prepare_model_for_kbit_training

    q = AutoModelForCausalLM.from_pretrained(tiny_path("llama"), quantization_config=QTuneConfig("nf4"),
                                             dtype=torch.bfloat16)
    packed = {n: b.clone() for n, b in q.named_buffers()}
    q = prepare_model_for_kbit_training(q)
    assert q.is_gradient_checkpointing
    # packed buffers untouched; float params upcast to fp32 and frozen
    assert all(torch.equal(b, packed[n]) for n, b in q.named_buffers())
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in q.parameters())
