"""GGUF files written by qtune (:func:`qtune.export.gguf.write_gguf`).

A tiny Llama/Qwen2 built from a config with a tiny byte-level BPE is written (Hugging Face source) and read back
by ``gguf.GGUFReader``, by qtune and by transformers' GGUF loader: same logits as the in-memory qtune model up to
the fp16 rounding of embeddings, same tokenizer. A GGUF-loaded model is written back with its source's metadata
and tensor types, byte-identical when unchanged (tiny file with every block type; the real SmolLM2 Q4_1 file).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import qtune  # noqa: E402
from qtune.export.gguf import forward_permute, write_gguf  # noqa: E402
from qtune.nn import LinearGGUF  # noqa: E402
from tests.integrations.test_gguf import write_tiny_llama  # noqa: E402
from tests.train.models import tiny_model, tiny_tokenizer  # noqa: E402

TEXT = "It is a truth universally acknowledged, that 1234 single men... <|end|> said Emma."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _hf_folder(root: Path, tok, arch: str = "llama", **config) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model("llama", vocab_size=len(tok))
    if arch != "llama" or config:
        cfg = AutoConfig.for_model(arch, **{**{k: v for k, v in model.config.to_dict().items()
                                               if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                        "num_hidden_layers", "num_attention_heads",
                                                        "num_key_value_heads", "max_position_embeddings",
                                                        "pad_token_id", "eos_token_id", "tie_word_embeddings")},
                                            **config})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).float()
        with torch.no_grad():  # qwen2's biases start at zero: make them matter
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.1)
    folder = root / f"hf-{arch}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _fp16_embeddings(model) -> None:
    """What the file stores for 2-D float tensors (F16), applied in memory."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearGGUF):
                continue
            for p in m.parameters(recurse=False):
                if p.dim() == 2:
                    p.data = p.data.half().float()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _transformers(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.mark.parametrize("arch,gguf_type", [("llama", "q4_1"), ("qwen2", "q5_1"), ("mistral", "q8_0")])
def test_hf_model_written_as_gguf_reads_back_everywhere(tmp_path, tok, arch, gguf_type):
    from transformers import AutoTokenizer

    folder = _hf_folder(tmp_path, tok, arch, **({"sliding_window": None} if arch == "mistral" else {}))
    model = qtune.load_model(folder, qtune.QTuneConfig(f"gguf_{gguf_type}", compute_dtype="float32"),
                             dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LinearGGUF)}
    assert len(layers) == 14
    path = tmp_path / "out" / "tiny.gguf"
    written = write_gguf(model, path, tokenizer=tok)
    assert written.path == path.absolute() and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name != "tiny.gguf"]  # no temporary file left

    # gguf's reader: names, types, metadata
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type.upper() and types["blk.1.ffn_down.weight"] == gguf_type.upper()
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    if arch == "qwen2":
        assert types["blk.0.attn_q.bias"] == "F32"
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    arch = "llama" if arch == "mistral" else arch  # llama.cpp writes Mistral as llama (convert_hf_to_gguf.py)
    assert field("general.architecture") == arch
    assert field(f"{arch}.block_count") == 2 and field(f"{arch}.embedding_length") == 64
    assert field(f"{arch}.attention.head_count") == 4 and field(f"{arch}.attention.head_count_kv") == 2
    assert field(f"{arch}.context_length") == 256 and field(f"{arch}.vocab_size") == len(tok)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert len(field("tokenizer.ggml.tokens")) == len(tok)
    assert field("tokenizer.ggml.token_type")[tok.eos_token_id] == gguf.TokenType.CONTROL
    assert field("tokenizer.chat_template") == tok.chat_template

    # the linear layers' blocks are written unchanged (q/k: rows permuted as llama.cpp does)
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    v = layers["model.layers.0.self_attn.v_proj"].weight.numpy()
    assert np.array_equal(raw["blk.0.attn_v.weight"], v)
    q = layers["model.layers.0.self_attn.q_proj"].weight.numpy()
    expected_q = forward_permute(q, 4) if arch == "llama" else q
    assert np.array_equal(raw["blk.0.attn_q.weight"], expected_q)

    ids = tok(TEXT, return_tensors="pt").input_ids
    _fp16_embeddings(model)
    reference = _logits(model, ids)
    # qtune reads it back: the same blocks and F16-rounded embeddings, so the same logits
    again = qtune.load_model(path, dtype=torch.float32)
    assert {type(m) for n, m in again.named_modules() if n in layers} == {LinearGGUF}
    torch.testing.assert_close(_logits(again, ids), reference, rtol=1e-5, atol=1e-5)
    # transformers' own GGUF loader (dequantizes with the gguf package, undoes the permutation)
    torch.testing.assert_close(_logits(_transformers(path), ids), reference, rtol=1e-4, atol=1e-4)
    # and its tokenizer from the file
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert hf_tok(TEXT).input_ids == tok(TEXT).input_ids


def test_float_model_quantized_while_writing_and_tied_embeddings(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    folder = _hf_folder(tmp_path, tok, "llama", tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    path = write_gguf(model, tmp_path / "f.gguf", gguf_type="q8_0", tokenizer=tok).path
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types and types["blk.1.attn_k.weight"] == "Q8_0"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    ids = tok(TEXT, return_tensors="pt").input_ids
    ref = _transformers(path)
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    _fp16_embeddings(model)
    # Q8_0 of every decoder linear weight: close to the float model, not equal
    a, b = _logits(ref, ids), _logits(model, ids)
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel < 2e-2


def test_gguf_source_written_back_bit_identical(tmp_path):
    src = write_tiny_llama(tmp_path / "src.gguf", tied=False)
    model = qtune.load_model(src, dtype=torch.float32)
    out = write_gguf(model, tmp_path / "back.gguf")
    assert len(out.kept) == len(out.tensors) and not out.quantized
    assert out.path.read_bytes() == src.read_bytes()


def test_gguf_source_changed_tensors_keep_their_types(tmp_path):
    src = write_tiny_llama(tmp_path / "src.gguf")
    model = qtune.load_model(src, dtype=torch.float32)
    with torch.no_grad():  # a merged layer is float now; a norm changed
        q = model.model.layers[1].self_attn.q_proj  # Q4_0 in the source
        dense = torch.nn.Linear(q.in_features, q.out_features, bias=False)
        dense.weight.copy_(q.dequantize(torch.float32) * 1.5)
        model.model.layers[1].self_attn.q_proj = dense
        model.model.layers[0].input_layernorm.weight.mul_(2)
    out = write_gguf(model, tmp_path / "changed.gguf")
    assert sorted(out.quantized) == ["blk.1.attn_q.weight"]
    assert "blk.0.attn_norm.weight" not in out.kept and "blk.0.attn_v.weight" in out.kept
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out.path))
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    again = qtune.load_model(out.path, dtype=torch.float32)
    norm = model.model.layers[0].input_layernorm.weight
    torch.testing.assert_close(again.model.layers[0].input_layernorm.weight, norm, rtol=0, atol=0)
    expected = qtune.formats.gguf.quantize_gguf(dense.weight, int(gguf.GGMLQuantizationType.Q4_0))
    assert torch.equal(again.model.layers[1].self_attn.q_proj.weight, expected)
    ids = torch.arange(20).view(1, -1)
    torch.testing.assert_close(_logits(again, ids), _logits(_transformers(out.path), ids), rtol=1e-5, atol=1e-5)


# -- refusals: one line, nothing written ----------------------------------------------------------------
def test_changed_k_quant_layer_is_refused(tmp_path):
    src = write_tiny_llama(tmp_path / "src.gguf")
    model = qtune.load_model(src, dtype=torch.float32)
    k = model.model.layers[0].self_attn.k_proj  # Q4_K
    dense = torch.nn.Linear(k.in_features, k.out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(k.dequantize(torch.float32) + 0.01)
    model.model.layers[0].self_attn.k_proj = dense
    with pytest.raises(ValueError, match=r"tensor blk\.0\.attn_k\.weight: changed, and qtune cannot quantize into its "
                                         r"source type Q4_K") as e:
        write_gguf(model, tmp_path / "x.gguf")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


def test_architecture_the_writer_cannot_express(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    from tests.train.models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tok)))
    with pytest.raises(ValueError, match=r"architecture 'gpt2': qtune writes GGUF for llama, mistral, qwen2") as e:
        write_gguf(model, tmp_path / "x.gguf", gguf_type="q8_0", tokenizer=tok)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())
    folder = _hf_folder(tmp_path, tok, "mistral", sliding_window=64)
    mistral = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"'mistral' with sliding_window=64"):
        write_gguf(mistral, tmp_path / "m.gguf", gguf_type="q8_0", tokenizer=tok)
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_gguf_cannot_name_is_refused(tmp_path, tok):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from tests.train.models import CORPUS

    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.decoder = decoders.Metaspace()
    spm.train_from_iterator([CORPUS], trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"],
                                                                  show_progress=False))
    model = AutoModelForCausalLM.from_pretrained(_hf_folder(tmp_path, tok), dtype=torch.float32)
    sentencepiece_like = PreTrainedTokenizerFast(tokenizer_object=spm)
    with pytest.raises(ValueError, match=r"tokenizer: a BPE model with a Metaspace decoder; qtune writes byte-level "
                                         r"BPE tokenizers"):
        write_gguf(model, tmp_path / "x.gguf", gguf_type="q8_0", tokenizer=sentencepiece_like)
    with pytest.raises(ValueError, match=r"a GGUF file needs the tokenizer"):
        write_gguf(model, tmp_path / "x.gguf", gguf_type="q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_a_head_untied_from_tied_embeddings_is_refused(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_hf_folder(tmp_path, tok), dtype=torch.float32)
    model.config.tie_word_embeddings = True  # but lm_head keeps its own weight
    with pytest.raises(ValueError, match=r"tensor lm_head\.weight: the config ties it to the input embeddings"):
        write_gguf(model, tmp_path / "x.gguf", gguf_type="q8_0", tokenizer=tok)
    assert not (tmp_path / "x.gguf").exists()


def test_existing_file_needs_overwrite_and_bad_type(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_hf_folder(tmp_path, tok), dtype=torch.float32)
    path = tmp_path / "x.gguf"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"x\.gguf: already exists"):
        write_gguf(model, path, gguf_type="q8_0", tokenizer=tok)
    assert path.read_bytes() == b"old"
    with pytest.raises(ValueError, match=r"--gguf-type 'q4_k': qtune quantizes into q4_0, q4_1, q5_0, q5_1, q8_0"):
        write_gguf(model, path, gguf_type="q4_k", tokenizer=tok, overwrite=True)
    assert path.read_bytes() == b"old"
    write_gguf(model, path, gguf_type="q8_0", tokenizer=tok, overwrite=True)
    assert gguf.GGUFReader(str(path)).fields["general.architecture"].contents() == "llama"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["x.gguf"]


def test_a_failure_while_writing_leaves_nothing(tmp_path, tok, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_hf_folder(tmp_path, tok), dtype=torch.float32)

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="No space left"):
        write_gguf(model, tmp_path / "x.gguf", gguf_type="q8_0", tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-llama"]


# -- the real model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_gguf():  # noqa: D103
    from qtune import assets

    try:
        return assets.smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.real_model
def test_smollm2_q4_1_round_trip_is_byte_identical(smollm2_gguf, tmp_path):
    model = qtune.load_model(smollm2_gguf, dtype=torch.float32)
    out = write_gguf(model, tmp_path / "smollm2.gguf")
    assert len(out.tensors) == 272 and len(out.kept) == 272 and not out.quantized
    # the whole file: header, every key/value entry (tokenizer included), tensor infos, tensor data
    assert out.path.read_bytes() == Path(smollm2_gguf).read_bytes()
