"""Existing checkpoints: transformers+bitsandbytes both ways, GPTQ v1 fixtures with known packing, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from qtune.integrations import QTuneConfig
from qtune.integrations.layouts import load_model, save_quantized
from qtune.nn import Linear4bit, LinearGPTQ, LinearLLMInt8, QuantLinear, linear_modules
from tests.conftest import bnb_available
from tests.integrations.tiny_models import tokens

needs_bnb = pytest.mark.skipif(not bnb_available(), reason="bitsandbytes is not installed (test dependency)")


def logits(model):
    with torch.no_grad():
        return model(tokens()).logits


def bnb_logits(model):
    # bitsandbytes' eval-mode CPU path repacks 4-bit weights for a fused bf16-ish kernel; in train mode it
    # runs the plain dequantize + matmul, the same maths as qtune. The tiny models have no dropout.
    model.train()
    return logits(model)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------
# bitsandbytes -> qtune
# ------------------------------------------------------------------------------------------------
BNB_4BIT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


@needs_bnb
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("quant_type,dq", BNB_4BIT)
def test_bnb_4bit_checkpoint_loads_into_qtune(arch, quant_type, dq, tiny_path, tmp_path):
    from transformers import BitsAndBytesConfig

    bc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=dq,
                            bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_path(arch), quantization_config=bc, dtype=torch.float32)
    ref.save_pretrained(tmp_path / "bnb")
    q = load_model(tmp_path / "bnb")
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert layers and all(isinstance(m, Linear4bit) and m.quant_type == quant_type for m in layers)
    assert all((m.nested_absmax is not None) == dq for m in layers)
    assert q.is_loaded_in_4bit
    # same bytes, same maths
    assert rel(logits(q), bnb_logits(ref)) < 1e-5
    # and it saves as a qtune checkpoint that reloads identically
    q.save_pretrained(tmp_path / "qtune")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "qtune")), logits(q))


@needs_bnb
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bnb_8bit_checkpoint_loads_into_qtune(arch, tiny_path, tmp_path):
    from transformers import BitsAndBytesConfig

    ref = AutoModelForCausalLM.from_pretrained(tiny_path(arch), quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                               dtype=torch.float32)
    ref.save_pretrained(tmp_path / "bnb8")
    q = load_model(tmp_path / "bnb8")
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert layers and all(isinstance(m, LinearLLMInt8) and m.threshold == 6.0 for m in layers)
    assert q.is_loaded_in_8bit and not q.is_loaded_in_4bit
    # same int8 bytes; bitsandbytes casts activations to fp16 before quantizing them, qtune keeps fp32
    assert rel(logits(q), bnb_logits(ref)) < 2e-2
    for name, m in q.named_modules():
        if isinstance(m, LinearLLMInt8):
            assert torch.equal(m.weight, ref.get_submodule(name).weight.data)


# ------------------------------------------------------------------------------------------------
# qtune -> bitsandbytes
# ------------------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("spec", [dict(format="nf4", double_quant=True), dict(format="fp4"),
                                  dict(format="nf4", blocksize=32)])
def test_qtune_writes_bnb_4bit_that_transformers_loads(arch, spec, tiny_path, tmp_path):
    # (blocksize 32, not 128: bitsandbytes 0.50.2's CPU dequantize_4bit is wrong when the block size exceeds
    # in_features, even for its own quantize_4bit output; the bytes are identical either way)
    import bitsandbytes as bnb

    q = AutoModelForCausalLM.from_pretrained(tiny_path(arch), quantization_config=QTuneConfig(**spec))
    save_quantized(q, tmp_path / "bnb", layout="bnb")
    cfg = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["load_in_4bit"]
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in ref.modules())
    assert rel(logits(q), bnb_logits(ref)) < 1e-5
    # and back into qtune, byte for byte
    back = load_model(tmp_path / "bnb")
    assert torch.equal(logits(back), logits(q))


@needs_bnb
@pytest.mark.parametrize("fmt", ["llm_int8", "int8"])
def test_qtune_writes_bnb_8bit_that_transformers_loads(fmt, tiny_path, tmp_path):
    import bitsandbytes as bnb

    q = AutoModelForCausalLM.from_pretrained(tiny_path("llama"), quantization_config=QTuneConfig(fmt))
    save_quantized(q, tmp_path / "bnb8", layout="bnb")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb8")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in ref.modules())
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(ref.get_submodule(name).weight.data, m.weight)
    # int8 (no outlier threshold) is plain int8 weights x float activations in both: ~exact
    assert rel(logits(q), bnb_logits(ref)) < (1e-5 if fmt == "int8" else 2e-2)


def test_bnb_layout_rejects_what_bitsandbytes_cannot_hold(tiny_path, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_path("llama"), quantization_config=QTuneConfig("rtn"))
    with pytest.raises(ValueError, match="bitsandbytes layout: layer .* is rtn"):
        save_quantized(q, tmp_path / "out", layout="bnb")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir()), "no temporary folder may be left behind"
    mixed = AutoModelForCausalLM.from_pretrained(tiny_path("llama"),
                                                 quantization_config=QTuneConfig("nf4", overrides={"down_proj": "int8"}))
    with pytest.raises(ValueError, match="mixed"):
        save_quantized(mixed, tmp_path / "out", layout="bnb")
    with pytest.raises(ValueError, match="GPTQ layout: layer .* is nf4"):
        save_quantized(mixed, tmp_path / "out", layout="gptq")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# GPTQ v1: a hand-built fixture with the reference (AutoGPTQ qlinear_cuda_old) packing loops
# ------------------------------------------------------------------------------------------------
def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's ``pack`` loop, verbatim in structure: [K, N] codes -> [K/32*bits, N] int32."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 codes, a straddling code, 10 codes, a straddling code, 10 codes
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


def autogptq_pack_zeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    """v1 ``qzeros``: ``zero - 1`` packed along the output dimension with the same loop."""
    return np.ascontiguousarray(autogptq_pack_rows((zeros - 1).T, bits).T)


def write_gptq_fixture(float_dir: Path, out: Path, *, bits: int, group_size: int, desc_act: bool, sym: bool,
                       seed: int = 0, fmt: str = "gptq") -> AutoModelForCausalLM:
    """A GPTQ checkpoint of random codes/zeros/scales; returns the float model holding the weights it encodes."""
    rng = np.random.default_rng(seed)
    model = AutoModelForCausalLM.from_pretrained(float_dir)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, module in linear_modules(model):
        if name == "lm_head":
            continue
        n, k = module.out_features, module.in_features
        g = k if group_size == -1 else group_size
        groups = -(-k // g)  # a partial last group when g does not divide k
        q = rng.integers(0, 2**bits, size=(k, n))
        low = 1 if fmt == "gptq" else 0  # AutoGPTQ's v1 packer can only hold zeros >= 1; v2 holds 0..2^b-1
        zeros = np.full((groups, n), 2 ** (bits - 1)) if sym else rng.integers(low, 2**bits, size=(groups, n))
        scales = torch.tensor(rng.uniform(0.002, 0.02, size=(groups, n)), dtype=torch.float16)
        g_idx = np.arange(k) // g
        if desc_act:
            g_idx = g_idx[rng.permutation(k)]
        w = scales.float()[torch.tensor(g_idx)] * (torch.tensor(q) - torch.tensor(zeros)[torch.tensor(g_idx)]).float()
        module.weight.data = w.T.contiguous()
        del tensors[f"{name}.weight"]
        tensors[f"{name}.qweight"] = torch.from_numpy(autogptq_pack_rows(q, bits))
        stored = zeros if fmt == "gptq" else zeros + 1  # v2 packs the zero itself, i.e. v1-packs zero + 1
        tensors[f"{name}.qzeros"] = torch.from_numpy(autogptq_pack_zeros(stored, bits))
        tensors[f"{name}.scales"] = scales
        tensors[f"{name}.g_idx"] = torch.tensor(g_idx, dtype=torch.int32)
    out.mkdir(parents=True)
    tensors.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                  "desc_act": desc_act, "sym": sym, "checkpoint_format": fmt}
    (out / "config.json").write_text(json.dumps(cfg))
    return model


def test_fixture_packer_matches_hand_computed_words():
    # 8 four-bit codes 1..8 in one word: 0x87654321; symmetric 4-bit zeros (8) store 7 -> 0x77777777
    codes = np.arange(1, 33).reshape(32, 1) % 16
    assert autogptq_pack_rows(codes, 4)[0, 0].view(np.uint32) == 0x87654321
    assert (autogptq_pack_zeros(np.full((1, 8), 8), 4).view(np.uint32) == 0x77777777).all()


@pytest.mark.parametrize("bits,group_size,desc_act,sym", [
    (4, 32, False, True), (4, 32, True, False), (3, 32, True, True), (3, -1, False, False),
    (2, 16, False, False), (8, 64, True, True), (4, 16, False, False), (4, 48, True, False)])
def test_gptq_v1_fixture_loads_with_known_packing(bits, group_size, desc_act, sym, tiny_path, tmp_path):
    ref = write_gptq_fixture(tiny_path("llama"), tmp_path / "gptq", bits=bits, group_size=group_size,
                             desc_act=desc_act, sym=sym)
    q = load_model(tmp_path / "gptq")
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(isinstance(m, LinearGPTQ) and m.bits == bits for m in layers)
    for name, m in q.named_modules():
        if isinstance(m, LinearGPTQ):
            assert torch.equal(m.dequantize(torch.float32), ref.get_submodule(name).weight)
    assert torch.allclose(logits(q), logits(ref), rtol=1e-5, atol=1e-5)
    if group_size != -1 and 64 % group_size:
        # partial groups load (any group size), but qtune writes the GPTQ layout with whole groups only
        with pytest.raises(ValueError, match=r"GPTQ layout: layer model\.layers\.0\.self_attn\.q_proj: group_size 48 "
                                             r"does not divide in_features 64"):
            save_quantized(q, tmp_path / "again", layout="gptq")
        assert not (tmp_path / "again").exists()
        return
    # qtune's own GPTQ writer reproduces the checkpoint tensors bit for bit
    save_quantized(q, tmp_path / "again", layout="gptq")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as b:
        for key in a.keys():
            if key.endswith(("qweight", "qzeros", "scales", "g_idx")):
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    qc = json.loads((tmp_path / "again" / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["checkpoint_format"]) == \
        (bits, group_size, desc_act, sym, "gptq")


def test_gptq_v2_zeros_are_repacked(tiny_path, tmp_path):
    ref = write_gptq_fixture(tiny_path("llama"), tmp_path / "v2", bits=4, group_size=32, desc_act=False, sym=False,
                             fmt="gptq_v2")
    assert torch.allclose(logits(load_model(tmp_path / "v2")), logits(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox"])
def test_gptq_layout_roundtrip_other_archs(arch, tiny_path, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_path(arch), quantization_config=QTuneConfig("rtn", bits=4, group_size=32))
    save_quantized(q, tmp_path / "g", layout="gptq")
    back = load_model(tmp_path / "g")
    for name, m in back.named_modules():
        if isinstance(m, LinearGPTQ):
            assert torch.equal(m.dequantize(torch.float32), q.get_submodule(name).dequantize(torch.float32))
    # the layout stores biases in fp16, as GPTQ checkpoints do
    assert torch.allclose(logits(back), logits(q), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def nf4_dir(tiny_path, tmp_path) -> Path:
    q = AutoModelForCausalLM.from_pretrained(tiny_path("llama"), quantization_config=QTuneConfig("nf4", double_quant=True))
    q.save_pretrained(tmp_path / "nf4")
    return tmp_path / "nf4"


def test_corrupt_safetensors_header(nf4_dir, tiny_path, tmp_path):
    f = nf4_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32  # garbage in the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
        load_model(nf4_dir)
    float_copy = tmp_path / "float"
    shutil.copytree(tiny_path("llama"), float_copy)
    (float_copy / "model.safetensors").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(float_copy, QTuneConfig("nf4"))
    with pytest.raises(ValueError, match="not a safetensors file"):  # the transformers entry point checks too
        AutoModelForCausalLM.from_pretrained(float_copy, quantization_config=QTuneConfig("nf4"))


def test_truncated_safetensors(nf4_dir):
    f = nf4_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated safetensors file: key '.*'"):
        load_model(nf4_dir)
    with pytest.raises(ValueError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(nf4_dir)


@pytest.mark.parametrize("change,match", [
    ({"double_quant": False}, r"key 'model\.layers\.0\.self_attn\.q_proj\.absmax' has dtype U8"),
    ({"blocksize": 32}, r"key 'model\.layers\.0\.self_attn\.q_proj\.absmax' has shape \[64\]"),
    ({"format": "int8", "double_quant": None}, r"key 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[64, 32\], but layer "
                                         r"model\.layers\.0\.self_attn\.q_proj \(.*\"int8\".*\) expects \[64, 64\]"),
])
def test_qtune_config_disagreeing_with_tensors(nf4_dir, change, match):
    cfg_file = nf4_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for k, v in change.items():
        if v is None:
            cfg["quantization_config"].pop(k)
        else:
            cfg["quantization_config"][k] = v
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_model(nf4_dir)


@needs_bnb
def test_bnb_config_disagreeing_with_tensors(tiny_path, tmp_path):
    from transformers import BitsAndBytesConfig

    ref = AutoModelForCausalLM.from_pretrained(tiny_path("llama"), quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    ref.save_pretrained(tmp_path / "bnb")
    cfg_file = tmp_path / "bnb" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"].update(load_in_4bit=False, load_in_8bit=True, _load_in_4bit=False, _load_in_8bit=True)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="load_in_4bit=False but the checkpoint holds 4-bit tensors"):
        load_model(tmp_path / "bnb")


def test_gptq_config_disagreeing_with_tensors(tiny_path, tmp_path):
    write_gptq_fixture(tiny_path("llama"), tmp_path / "g", bits=4, group_size=32, desc_act=False, sym=True)
    cfg_file = tmp_path / "g" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["bits"] = 8
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"key 'model\.layers\.0\.self_attn\.q_proj\.qweight' is I32 \[8, 64\], "
                                         r"expected I32 \[16, 64\] for bits=8"):
        load_model(tmp_path / "g")
    cfg["quantization_config"].update(bits=4, group_size=16)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"key 'model\.layers\.0\.self_attn\.q_proj\.qzeros' is I32 \[2, 8\], "
                                         r"expected I32 \[4, 8\] for bits=4, group_size=16"):
        load_model(tmp_path / "g")


def test_safetensors_only_and_not_quantized(tiny_path, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tiny_path("llama") / "config.json", folder)
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no .safetensors weights .found pytorch_model.bin: qtune reads safetensors only"):
        load_model(folder)
    with pytest.raises(ValueError, match="not quantized; pass config="):
        load_model(tiny_path("llama"))
    with pytest.raises(ValueError, match="config.json: not found"):
        load_model(tmp_path)


def test_existing_destination_is_not_touched(nf4_dir, tmp_path):
    q = load_model(nf4_dir)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        save_quantized(q, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    save_quantized(q, tmp_path / "taken", overwrite=True)
    assert not (tmp_path / "taken" / "keep.txt").exists() and (tmp_path / "taken" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nf4", "taken"]
