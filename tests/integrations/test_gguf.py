"""GGUF files read as qtune models: ``qtune.load_model("file.gguf")``.

A tiny Llama written with ``gguf.GGUFWriter`` (every block type qtune reads, one per linear weight) must give
the logits of transformers' own GGUF loader (which dequantizes everything with the gguf package); the real
SmolLM2 Q4_1 file must give the logits of its fp32 conversion and train with LoRA; bad files fail in one line.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

import qtune  # noqa: E402
from qtune.formats.gguf import BY_GGML_TYPE, quantize_gguf  # noqa: E402
from qtune.integrations.layouts import layout_names, storing_layouts  # noqa: E402
from qtune.nn import LinearGGUF  # noqa: E402

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 256, 512, 4, 2, 96, 2
# one type per linear weight of each block, so every type meets the loader (K-quants need K % 256 == 0)
TYPES = {"attn_q": T.Q4_1, "attn_k": T.Q4_K, "attn_v": T.Q5_0, "attn_output": T.Q5_1,
         "ffn_gate": T.Q8_0, "ffn_up": T.Q5_K, "ffn_down": T.Q6_K}
SECOND_BLOCK = {"attn_q": T.Q4_0, "attn_k": T.Q4_1}


def _k_blocks(rng, qtype, n: int, k: int) -> np.ndarray:
    """Random K-quant blocks with small finite fp16 scales (no quantizer exists for them)."""
    cfg = BY_GGML_TYPE[int(qtype)]
    blocks = rng.integers(0, 256, (n * k // cfg.block_size, cfg.type_size), dtype=np.uint8)
    for off in ([208] if qtype == T.Q6_K else [0, 2]):
        blocks[:, off:off + 2] = (np.abs(rng.standard_normal(len(blocks))) * 0.002).astype(np.float16) \
            .view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, cfg.row_bytes(k))


def write_tiny_llama(path: Path, types=None, *, seed: int = 0, tied: bool = True, arch: str = "llama") -> Path:
    """A 2-block Llama GGUF with random weights, linear weights in ``types`` (per GGUF tensor kind); with
    ``arch="qwen2"`` a Qwen2 (the same tensors plus q/k/v biases)."""
    rng = np.random.default_rng(seed)
    types = {**TYPES, **(types or {})}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(VOCAB)
    tokens = [chr(c) for c in range(33, 33 + VOCAB - 1)] + ["ab"]  # a byte-level BPE with one merge
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_tensor("token_embd.weight", (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32))
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
              "attn_v": (HIDDEN // HEADS * KV_HEADS, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
              "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        if arch == "qwen2":
            for kind in ("attn_q", "attn_k", "attn_v"):
                w.add_tensor(f"blk.{i}.{kind}.bias", (0.1 * rng.standard_normal(shapes[kind][0])).astype(np.float32))
        for kind, (n, k) in shapes.items():
            qtype = (SECOND_BLOCK.get(kind, types[kind]) if i == 1 else types[kind])
            name = f"blk.{i}.{kind}.weight"
            if qtype in (T.F32, T.F16):
                w.add_tensor(name, (rng.standard_normal((n, k)) * 0.05).astype(np.float32 if qtype == T.F32 else np.float16))
            elif qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
                w.add_tensor(name, _k_blocks(rng, qtype, n, k), raw_dtype=qtype)
            elif qtype == T.Q2_K:  # a type qtune has no layer for
                w.add_tensor(name, np.zeros((n, k // 256 * 84), dtype=np.uint8), raw_dtype=qtype)
            else:
                dense = torch.from_numpy((rng.standard_normal((n, k)) * 0.05).astype(np.float32))
                w.add_tensor(name, quantize_gguf(dense, int(qtype)).numpy(), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", (rng.standard_normal((VOCAB, HIDDEN)) * 0.05).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _transformers_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def test_tiny_gguf_loads_with_every_block_type_and_gives_transformers_logits(tiny_gguf):
    model = qtune.load_model(tiny_gguf, dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LinearGGUF)}
    assert len(layers) == 7 * LAYERS
    got_types = {layers[f"model.layers.0.{p}"].config.type_name for p in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")}
    assert got_types == {"Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q8_0", "Q5_K", "Q6_K"}
    assert layers["model.layers.1.self_attn.q_proj"].config.type_name == "Q4_0"
    assert all(m.weight.dtype == torch.uint8 for m in layers.values())

    # the blocks are the file's bytes (v_proj: no permutation; q_proj: rows of blocks permuted back)
    reader = gguf.GGUFReader(str(tiny_gguf))
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    assert np.array_equal(layers["model.layers.0.self_attn.v_proj"].weight.numpy(), raw["blk.0.attn_v.weight"])
    q = layers["model.layers.0.self_attn.q_proj"].weight.numpy()
    assert not np.array_equal(q, raw["blk.0.attn_q.weight"])
    assert sorted(map(bytes, q)) == sorted(map(bytes, raw["blk.0.attn_q.weight"]))

    ref = _transformers_model(tiny_gguf)
    ref_sd = ref.state_dict()
    for name, layer in layers.items():  # every dequantized weight equals transformers' bit for bit
        assert torch.equal(layer.dequantize(torch.float32), ref_sd[name + ".weight"]), name
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_qwen2_gguf_with_biases(tmp_path):
    path = write_tiny_llama(tmp_path / "qwen.gguf", arch="qwen2")
    model = qtune.load_model(path, dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LinearGGUF) and q.bias is not None and q.bias.abs().sum() > 0
    ref = _transformers_model(path)
    assert torch.equal(q.bias, ref.model.layers[0].self_attn.q_proj.bias)
    ids = torch.arange(20).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_gguf_model_saves_in_the_qtune_layout_and_reloads(tiny_gguf, tmp_path):
    model = qtune.load_model(tiny_gguf, dtype=torch.float32)
    out = qtune.save_quantized(model, tmp_path / "q")
    again = qtune.load_model(out, dtype=torch.float32)
    assert sum(isinstance(m, LinearGGUF) for m in again.modules()) == 7 * LAYERS
    ids = torch.arange(20).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_recipe_trains_from_a_gguf_file(tiny_gguf, tmp_path):
    from qtune.train.base_model import load_base
    from qtune.train.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
model:
  path: {tiny_gguf}
  dtype: float32
quantization:
  format: pretrained
lora:
  r: 4
dataset:
  train:
    source: data.jsonl
training:
  max_steps: 1
output:
  dir: {tmp_path / "out"}
""")
    base = load_base(load_recipe(recipe))
    assert sum(isinstance(m, LinearGGUF) for m in base.model.modules()) == 7 * LAYERS
    assert base.tokenizer("ab!").input_ids == [95, 0]  # the GGUF's own vocabulary and merge
    assert base.tokenizer.pad_token == base.tokenizer.eos_token


def test_a_float_model_quantizes_to_gguf_types_while_loading(tmp_path):
    from tests.train.models import save_tiny_model_dir

    float_dir = save_tiny_model_dir(tmp_path / "float")
    model = qtune.load_model(float_dir, qtune.QTuneConfig("gguf_q5_1", compute_dtype="float32"), dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, LinearGGUF)]
    assert layers and {m.config.format for m in layers} == {"gguf_q5_1"}
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    name = next(n for n, m in model.named_modules() if isinstance(m, LinearGGUF))
    w = ref.get_submodule(name).weight.detach()
    expected = gguf.quants.quantize(w.numpy(), T.Q5_1)
    assert np.array_equal(model.get_submodule(name).weight.numpy(), expected)


def test_qtune_eval_reads_a_gguf_file(tiny_gguf, tmp_path, capsys):
    from qtune.cli.main import main

    text = tmp_path / "t.txt"
    text.write_text("abc def ghi! " * 200)
    code = main(["eval", str(tiny_gguf), "--text", str(text), "--tokens", "256", "--seq-len", "64", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = out.splitlines()[2:]
    assert len(rows) == 1 and rows[0].split()[:2] == ["gguf", "tiny.gguf"] and float(rows[0].split()[3]) > 1
    code = main(["eval", str(tmp_path / "missing.gguf"), "--text", str(text)])
    assert code != 0 and "missing.gguf does not exist" in capsys.readouterr().err


def test_gguf_layout_reads_and_does_not_write_yet():
    from qtune.formats.gguf import GGUFQ4_1Config

    assert "gguf" in layout_names()
    assert "gguf" not in storing_layouts(GGUFQ4_1Config())
    assert storing_layouts(GGUFQ4_1Config()) == ("qtune",)


def test_untied_output_and_float_linear_weights(tmp_path):
    path = write_tiny_llama(tmp_path / "f.gguf", {"ffn_up": T.F32, "attn_k": T.F16}, tied=False)
    model = qtune.load_model(path, dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.k_proj, torch.nn.Linear)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ref = _transformers_model(path)
    ids = torch.arange(16).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


# -- bad input: one line naming the file (and tensor) -------------------------------------------------------
def test_truncated_file_is_named(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(ValueError, match=r"cut\.gguf: .*(truncated|corrupt)") as e:
        qtune.load_model(cut)
    assert "\n" not in str(e.value)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"head\.gguf: not a readable GGUF file") as e:
        qtune.load_model(head)
    assert "\n" not in str(e.value)


def test_corrupt_magic_and_missing_file(tiny_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"XXXX" + tiny_gguf.read_bytes()[4:])
    with pytest.raises(ValueError, match=r"bad\.gguf: not a readable GGUF file"):
        qtune.load_model(bad)
    with pytest.raises(ValueError, match=r"nope\.gguf: no such GGUF file"):
        qtune.load_model(tmp_path / "nope.gguf")


def test_unknown_tensor_type_names_the_file_and_tensor(tmp_path):
    path = write_tiny_llama(tmp_path / "q2k.gguf", {"ffn_down": T.Q2_K})
    with pytest.raises(ValueError, match=r"q2k\.gguf: tensor blk\.0\.ffn_down\.weight has type Q2_K, which qtune "
                                         r"does not hold"):
        qtune.load_model(path)
    # a type id the gguf package does not know at all
    data = bytearray(path.read_bytes())
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    type_offset = int(reader.fields[f"{t.name}"].offset) if t.name in reader.fields else None
    assert type_offset is None  # tensor infos are not fields; find the type word after the name and dims
    name = t.name.encode()
    at = bytes(data).index(name) + len(name) + 4 + 8 * len(t.shape)
    assert int.from_bytes(data[at:at + 4], "little") == int(T.Q2_K)
    data[at:at + 4] = (250).to_bytes(4, "little")
    weird = tmp_path / "weird.gguf"
    weird.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"weird\.gguf: not a readable GGUF file"):
        qtune.load_model(weird)


def test_architectures_whose_tensors_transformers_rewrites_are_refused(tiny_gguf):
    from transformers.modeling_gguf_pytorch_utils import Gemma2TensorProcessor

    from qtune.integrations.layouts import gguf as layout

    model = _transformers_model(tiny_gguf)
    with pytest.raises(ValueError, match=r"tiny\.gguf: tensor blk\.0\.attn_q\.weight: transformers rewrites 'gemma2' "
                                         r"tensors \(Gemma2TensorProcessor\)"):
        layout.translate(tiny_gguf, layout.open_reader(tiny_gguf), model, Gemma2TensorProcessor(config={}), "gemma2",
                         torch.float32)


def test_config_is_refused_for_a_gguf_file(tiny_gguf):
    with pytest.raises(ValueError, match=r"tiny\.gguf: already quantized \(gguf\)"):
        qtune.load_model(tiny_gguf, "nf4")


# -- the real model --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_gguf():
    from qtune import assets

    try:
        return assets.smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_qtune(smollm2_gguf):
    return qtune.load_model(smollm2_gguf, dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm2_ids(smollm2_gguf):
    from qtune.integrations.layouts.gguf import load_tokenizer

    return _austen_ids(load_tokenizer(smollm2_gguf))


def _austen_ids(tokenizer, n: int = 48) -> torch.Tensor:
    from qtune.assets import austen_text

    return tokenizer(austen_text("persuasion")[5000:8000], return_tensors="pt").input_ids[:, :n]


def test_smollm2_q4_1_gives_the_fp32_conversion_logits(smollm2_qtune, smollm2_ids):
    from transformers import AutoModelForCausalLM

    from qtune import assets

    model = smollm2_qtune
    layers = [m for m in model.modules() if isinstance(m, LinearGGUF)]
    assert len(layers) == 210 and {m.config.type_name for m in layers} == {"Q4_1"}
    ref = AutoModelForCausalLM.from_pretrained(assets.smollm2_path(), dtype=torch.float32)
    ids = smollm2_ids
    assert ids.shape[1] == 48
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_smollm2_q4_1_lora_step(smollm2_qtune, smollm2_ids):
    from peft import LoraConfig

    model = qtune.get_peft_model(smollm2_qtune, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj", "down_proj"],
                                                           task_type="CAUSAL_LM"))
    ids = smollm2_ids[:, :32]
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=1e-2)
    losses = []
    for step in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        if step == 1:
            grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(m.weight.dtype == torch.uint8 for m in model.modules() if isinstance(m, LinearGGUF))
