"""Write a qtune model as one GGUF file (llama.cpp, Ollama, LM Studio; transformers' GGUF loader).

:func:`write_gguf` has two sources:

**A GGUF file** (the model came from ``qtune.load_model("x.gguf")``, possibly fine-tuned and merged): the file
keeps every key/value entry of the source (architecture, hyper-parameters, tokenizer, chat template, ``general.*``)
and every tensor in the source's order and GGML type:

- a :class:`~qtune.nn.LinearGGUF` layer's blocks are written as they are (rows re-permuted, see below), so an
  unchanged layer is bit-identical to the source;
- a float tensor of the model (norms, embeddings, a merged linear weight) whose value equals the source tensor as
  transformers reads it (dequantized, permuted, cast to the model's dtype) is written with the source's bytes;
  a changed one is written in the source's type (F32/F16/BF16 cast; a 32-weight block type quantized with
  :func:`~qtune.formats.gguf.quantize_gguf`; a K-quant cannot be re-quantized: refused, naming the tensor);
- source tensors transformers does not read (e.g. ``rope_freqs``) are copied unchanged.

**A Hugging Face model** (float, or qtune-quantized layers, which are dequantized): tensors are named with the
``gguf`` package's ``TensorNameMap`` for the architecture (``llama`` — also Mistral, as llama.cpp's
``convert_hf_to_gguf.py`` writes it — and ``qwen2``); the linear layers of the decoder blocks are quantized into
``gguf_type`` (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) or, when already :class:`~qtune.nn.LinearGGUF`, written as they are;
token embedding and output head as F16 and 1-D tensors (norms, biases) as F32, as ``convert_hf_to_gguf.py
--outtype f16`` does. Metadata: context length, embedding length, block count, feed-forward length, heads,
KV heads, rope theta and dimension count, RMS epsilon, vocabulary size, file type; the tokenizer (a byte-level
BPE: tokens, token types, merges, pre-tokenizer name, bos/eos/unk/pad ids, chat template).

Row permutation: llama.cpp stores the rows of ``attn_q``/``attn_k`` (weights and biases) of the ``llama``
architecture interleaved for its rotary layout, ``w.reshape(n_head, 2, rows / n_head / 2, ...).swapaxes(1, 2)``
(``n_head`` = KV heads for ``attn_k``); transformers undoes it when reading (``LlamaTensorProcessor``). It moves
whole rows, so it applies to quantized blocks ``[rows, bytes per row]`` exactly.

The file is written to a temporary file next to ``path`` and renamed at the end (:func:`qtune.atomic.atomic_file`);
errors are ``ValueError`` with one line naming the tensor, layer or architecture, and nothing is written.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_file
from ..formats.gguf import GGUF_CONFIGS, GGUFConfig, config_for_ggml_type, quantize_gguf
from ..nn import LinearGGUF, QuantLinear, is_conv1d

__all__ = ["write_gguf", "GGUFWritten", "GGUF_TYPES", "HF_ARCHITECTURES", "parse_gguf_type", "forward_permute"]

# the types a Hugging Face model's linear layers can be quantized into (the gguf package's quantizers)
GGUF_TYPES: dict[str, type[GGUFConfig]] = {c.type_name.lower(): c for c in GGUF_CONFIGS if c.can_quantize}
# transformers model_type -> GGUF architecture name (and whether attn_q/attn_k rows are permuted)
HF_ARCHITECTURES: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                                 "qwen2": ("qwen2", False)}
# llama.cpp's general.file_type for a model "mostly" in one type (gguf.LlamaFileType)
_FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}
_FLOAT_NP = {"F32": np.float32, "F16": np.float16}


@dataclasses.dataclass
class GGUFWritten:
    """What :func:`write_gguf` wrote.

    Attributes:
        path: the GGUF file.
        architecture: ``general.architecture``.
        tensors: ``{gguf tensor name: GGML type name}`` in file order.
        kept: GGUF tensors written with the source file's bytes (GGUF source only).
        quantized: GGUF tensors quantized by this write.
    """

    path: Path
    architecture: str
    tensors: dict[str, str] = dataclasses.field(default_factory=dict)
    kept: list[str] = dataclasses.field(default_factory=list)
    quantized: list[str] = dataclasses.field(default_factory=list)


def parse_gguf_type(spec: str | int | type[GGUFConfig]) -> type[GGUFConfig]:
    """``q4_1``/``Q4_1``/``gguf_q4_1`` (or a GGML type id / config class) → the config class.

    Raises:
        ValueError: not a type qtune can quantize into (the K-quants have no quantizer).
    """
    if isinstance(spec, type) and issubclass(spec, GGUFConfig):
        cfg = spec
    elif isinstance(spec, int):
        cfg = config_for_ggml_type(spec)
    else:
        cfg = GGUF_TYPES.get(str(spec).lower().removeprefix("gguf_"))
    if cfg is None or not cfg.can_quantize:
        raise ValueError(f"--gguf-type {spec!r}: qtune quantizes into {', '.join(GGUF_TYPES)} only")
    return cfg


def forward_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of the first axis (HF rotary halves → interleaved pairs).

    Args:
        w: ``[rows, ...]`` (a weight, its GGUF blocks ``[rows, bytes per row]``, or a bias ``[rows]``).
        n_head: attention heads; ``n_head_kv`` replaces it when it differs (``attn_k``).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_bytes(x: np.ndarray) -> np.ndarray:
    """A tensor as uint8 ``[..., bytes per row]`` (what ``GGUFWriter.add_tensor`` takes with ``raw_dtype``)."""
    x = np.ascontiguousarray(x)
    return x.view(np.uint8).reshape(*x.shape[:-1], -1) if x.ndim else x.reshape(1).view(np.uint8)


def _float_bytes(t: torch.Tensor, type_name: str) -> np.ndarray:
    if type_name == "BF16":
        return _to_bytes(t.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy())
    if type_name not in _FLOAT_NP:
        raise ValueError(f"float type {type_name} is not one qtune writes (F32, F16, BF16)")
    return _to_bytes(t.detach().float().cpu().numpy().astype(_FLOAT_NP[type_name]))


def _quantized_bytes(t: torch.Tensor, cfg: type[GGUFConfig], name: str) -> np.ndarray:
    if t.dim() != 2:
        raise ValueError(f"tensor {name}: {cfg.type_name} needs a 2-D weight, got shape {tuple(t.shape)}")
    if not cfg.can_quantize:
        raise ValueError(f"tensor {name}: changed, and qtune cannot quantize into its source type {cfg.type_name} "
                         "(neither can the gguf package); export a Hugging Face base with --gguf-type instead")
    return quantize_gguf(t.detach().float().cpu(), cfg.ggml_type, name=name).numpy()


def _model_tensors(model: nn.Module) -> dict[str, Any]:
    """``{state name: Tensor or LinearGGUF}``: every parameter (ties once) and every LinearGGUF layer's blocks."""
    # QuantLinear layers hold their weight in buffers: the layer stands for it (LinearGGUF: blocks written as they
    # are; other formats: dequantized)
    out: dict[str, Any] = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, p in model.named_parameters():
        out.setdefault(name, p)
    return out


def _dense(value: Any) -> torch.Tensor:
    """A float [out, in] (or 1-D) view of a model tensor (QuantLinear: dequantized in fp32)."""
    if isinstance(value, QuantLinear):
        return value.dequantize(torch.float32)
    return value.detach()


# ---------------------------------------------------------------------------------------------------------
# GGUF source: the source file's metadata and tensor types
# ---------------------------------------------------------------------------------------------------------
def _copy_fields(reader, writer) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue  # the header and the architecture are written by GGUFWriter itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if key == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(value)
        writer.add_key_value(key, value, vtype, sub_type=sub)


def _from_gguf(model: nn.Module, source: Path, reader, writer, result: GGUFWritten,
               log: Callable[[str], None]) -> None:
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    from ..integrations.layouts.gguf import FLOAT_TYPES, _block_safe, _processor, cached_name_maps

    architecture, processor = _processor(reader, model.config)
    if architecture != result.architecture:
        raise ValueError(f"{source}: architecture {architecture!r}, but the model is {result.architecture!r}")
    if not _block_safe(processor):
        raise ValueError(f"{source}: transformers rewrites {architecture!r} tensors ({type(processor).__name__}); "
                         "qtune writes GGUF back only for architectures whose tensors need at most llama's row "
                         "permutation")
    permuting = isinstance(processor, LlamaTensorProcessor)
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    with cached_name_maps():
        key_map = get_gguf_hf_weights_map(model, processor)
    tensors = _model_tensors(model)
    used: set[str] = set()
    _copy_fields(reader, writer)
    for t in reader.tensors:
        qtype = t.tensor_type
        src_bytes = _to_bytes(np.asarray(t.data))
        hf = key_map.get(t.name)
        value = tensors.get(hf) if hf is not None else None
        if value is None:  # not a tensor of the model (transformers skips it too): copied as it is
            if hf is not None and hf not in tensors and not _tied(model, hf):
                raise ValueError(f"{source}: tensor {t.name} maps to {hf}, which the model does not have")
            _add(writer, result, t.name, src_bytes, qtype)
            result.kept.append(t.name)
            continue
        used.add(hf)
        rows_permuted = permuting and (".attn_q." in t.name or ".attn_k." in t.name)

        def back(x: np.ndarray) -> np.ndarray:  # HF row order -> the file's
            if not rows_permuted:
                return x
            return forward_permute(x, n_head, n_head if ".attn_q." in t.name else n_kv)

        if isinstance(value, LinearGGUF):
            blocks = back(value.weight.detach().cpu().numpy())
            if int(value.ggml_type) != int(qtype):
                log(f"qtune gguf: {t.name}: {qtype.name} in {source.name}, written as the layer's "
                    f"{value.config.type_name}")
            _add(writer, result, t.name, blocks, gguf.GGMLQuantizationType(int(value.ggml_type)))
            if np.array_equal(blocks, src_bytes):
                result.kept.append(t.name)
            continue
        dense = _dense(value)
        try:
            ref = torch.from_numpy(_source_as_read(gguf, t, rows_permuted, n_head, n_kv))
        except NotImplementedError:
            raise ValueError(f"{source}: tensor {t.name} has type {qtype.name}, which the gguf package cannot "
                             "dequantize") from None
        if tuple(ref.shape) != tuple(dense.shape):
            raise ValueError(f"{source}: tensor {t.name} has shape {tuple(ref.shape)}, but the model's {hf} is "
                             f"{tuple(dense.shape)}")
        if torch.equal(ref.to(dense.dtype), dense.cpu()):
            _add(writer, result, t.name, src_bytes, qtype)
            result.kept.append(t.name)
            continue
        file_order = torch.from_numpy(back(dense.float().cpu().numpy()))
        if qtype.name in FLOAT_TYPES:
            data = _float_bytes(file_order, qtype.name)
        else:
            cfg = config_for_ggml_type(int(qtype))
            if cfg is None:
                raise ValueError(f"{source}: tensor {t.name} has type {qtype.name}, which qtune cannot write")
            data = _quantized_bytes(file_order, cfg, t.name)
            result.quantized.append(t.name)
        _add(writer, result, t.name, data, qtype)
    missing = [n for n in tensors if n not in used]
    if missing:
        raise ValueError(f"{source}: the model's tensor {missing[0]} has no tensor in the source GGUF file "
                         f"({len(missing)} such); it cannot be written in the source's layout")


def _source_as_read(gguf, t, rows_permuted: bool, n_head: int, n_kv: int) -> np.ndarray:
    """The source tensor as transformers reads it (dequantized fp32, rows in HF order).

    Block types qtune holds go through :func:`~qtune.formats.gguf.dequantize_gguf` (equal to the gguf package's
    numpy dequantizer bit for bit, and faster); the rest through ``gguf.quants.dequantize``.
    """
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from ..formats.gguf import dequantize_gguf

    cfg = config_for_ggml_type(int(t.tensor_type))
    if cfg is not None and len(t.data.shape) == 2:
        w = dequantize_gguf(torch.from_numpy(np.array(t.data, dtype=np.uint8)), cfg.ggml_type,
                            int(t.shape[0])).numpy()
    else:
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    if rows_permuted:
        w = LlamaTensorProcessor._reverse_permute_weights(None, w, n_head, n_head if ".attn_q." in t.name else n_kv)
    return np.ascontiguousarray(w)


def _tied(model: nn.Module, hf: str) -> bool:
    """``hf`` is the output head's weight and the model ties it to the input embeddings."""
    return hf.startswith("lm_head.") and bool(getattr(model.config, "tie_word_embeddings", False))


def _add(writer, result: GGUFWritten, name: str, data: np.ndarray, qtype) -> None:
    writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.uint8), raw_dtype=qtype)
    result.tensors[name] = qtype.name


# ---------------------------------------------------------------------------------------------------------
# Hugging Face source: names, metadata and tokenizer as convert_hf_to_gguf.py writes them
# ---------------------------------------------------------------------------------------------------------
def hf_architecture(config) -> tuple[str, bool]:
    """``(GGUF architecture, permute q/k rows)`` for a transformers config.

    Raises:
        ValueError: an architecture (or a variant of one) that qtune's writer cannot express.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(f"architecture {model_type!r}: qtune writes GGUF for {', '.join(HF_ARCHITECTURES)} models "
                         "only (a GGUF-loaded model of any architecture qtune reads is written back as its source)")
    if model_type in ("llama", "mistral") and (getattr(config, "attention_bias", False)
                                               or getattr(config, "mlp_bias", False)):
        raise ValueError(f"architecture {model_type!r} with attention_bias/mlp_bias: transformers' GGUF loader drops "
                         "those biases; qtune does not write it")
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" and window is not None and window < config.max_position_embeddings:
        raise ValueError(f"architecture 'mistral' with sliding_window={window}: GGUF's llama architecture has no "
                         "sliding window, so the file would compute differently past it")
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"architecture {model_type!r} with rope_type {rope.get('rope_type')!r}: qtune writes the "
                         "default rotary embedding only")
    return HF_ARCHITECTURES[model_type]


def _rope(config) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    return rope


def _file_type(model: nn.Module, linear_cfg: type[GGUFConfig] | None) -> int:
    """``general.file_type``: the type most decoder linear weights are in (``gguf.LlamaFileType``; 1 = F16)."""
    from collections import Counter

    if linear_cfg is not None:
        return _FILE_TYPES[linear_cfg.type_name]
    held = Counter(m.config.type_name for m in model.modules() if isinstance(m, LinearGGUF))
    if not held:
        return 1
    return _FILE_TYPES.get(held.most_common(1)[0][0], 1)


def _write_config(writer, config, file_type: int) -> None:
    import gguf

    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    name = Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model"
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv))
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE's pre-tokenizer (tokenizer.json)."""
    def byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if pre and byte_level(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and byte_level(parts[1])):
            return "smollm"
    raise ValueError(f"tokenizer: pre-tokenizer {pre and pre.get('type')!r} is not one qtune can name for llama.cpp "
                     "(a GPT-2 byte-level split, or SmolLM's digits + byte-level)")


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``), as convert_hf_to_gguf.py's ``get_vocab_base``.

    Raises:
        ValueError: not a byte-level BPE, or more tokens than the model's vocabulary.
    """
    import json

    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__}: qtune writes fast (tokenizers) byte-level BPE "
                         "tokenizers to GGUF only")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"tokenizer: a {model.get('type')} model with a {(spec.get('decoder') or {}).get('type')} "
                         "decoder; qtune writes byte-level BPE tokenizers (GPT-2 style) to GGUF only")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer: token id {max(vocab.values())} does not fit the model's vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = {a.content: a for a in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _decoder_linear(model: nn.Module, hf: str) -> bool:
    """A weight of a linear layer inside the decoder blocks (what llama.cpp quantizes to the file type)."""
    owner = hf.rpartition(".")[0]
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    linear = isinstance(module, (nn.Linear, QuantLinear)) or is_conv1d(module)
    return linear and hf.endswith(".weight") and ".layers." in hf


def _from_hf(model: nn.Module, writer, result: GGUFWritten, linear_cfg: type[GGUFConfig] | None, tokenizer,
             permuting: bool) -> None:
    import gguf

    config = model.config
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == result.architecture)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    _write_config(writer, config, _file_type(model, linear_cfg))
    if tokenizer is None:
        raise ValueError("a GGUF file needs the tokenizer: pass tokenizer= (the run's or the base's)")
    _write_tokenizer(writer, tokenizer, int(config.vocab_size))
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf, value in _model_tensors(model).items():
        if tied and hf.startswith("lm_head."):
            # named_parameters lists a tied head once (as the embeddings); a head listed apart was untied
            raise ValueError(f"tensor {hf}: the config ties it to the input embeddings, but the model holds another "
                             "weight; GGUF would drop it (set config.tie_word_embeddings=False, or tie them)")
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor {hf}: the gguf package has no {result.architecture} tensor name for it")
        kind = name.split(".")[-2]
        perm = permuting and kind in ("attn_q", "attn_k")

        def back(x: np.ndarray) -> np.ndarray:
            return forward_permute(x, n_head, n_head if kind == "attn_q" else n_kv) if perm else x

        if isinstance(value, LinearGGUF):
            _add(writer, result, name, back(value.weight.detach().cpu().numpy()),
                 gguf.GGMLQuantizationType(int(value.ggml_type)))
            continue
        dense = _dense(value).float().cpu()
        if is_conv1d(model.get_submodule(hf.rpartition(".")[0])) and dense.dim() == 2:
            dense = dense.t()
        file_order = torch.from_numpy(back(np.ascontiguousarray(dense.numpy())))
        if dense.dim() == 2 and linear_cfg is not None and _decoder_linear(model, hf):
            _add(writer, result, name, _quantized_bytes(file_order, linear_cfg, hf),
                 gguf.GGMLQuantizationType(linear_cfg.ggml_type))
            result.quantized.append(name)
        elif dense.dim() >= 2:
            _add(writer, result, name, _float_bytes(file_order, "F16"), gguf.GGMLQuantizationType.F16)
        else:
            _add(writer, result, name, _float_bytes(file_order, "F32"), gguf.GGMLQuantizationType.F32)


def gguf_source_of(model: nn.Module) -> Path | None:
    """The GGUF file a model was loaded from (``qtune.load_model("x.gguf")`` records it), if it still exists."""
    from ..integrations.layouts.gguf import is_gguf_path

    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and is_gguf_path(name) and Path(name).is_file():
        return Path(name)
    return None


def write_gguf(model: nn.Module, path: str | Path, *, source: str | Path | None = None,
               gguf_type: str | type[GGUFConfig] | None = None, tokenizer: Any = None, overwrite: bool = False,
               log: Callable[[str], None] = lambda s: None) -> GGUFWritten:
    """Write ``model`` to the GGUF file ``path`` (atomically).

    Args:
        model: a transformers causal LM (float, qtune ``QuantLinear`` layers, or loaded from a GGUF file).
        path: the ``.gguf`` file to write.
        source: the GGUF file the model was loaded from (default: the one ``qtune.load_model`` recorded, if any):
            its metadata, tokenizer and tensor types are kept. ``None`` for a Hugging Face model.
        gguf_type: Hugging Face source only: the type of the decoder's linear weights (``q4_0``, ``q4_1``,
            ``q5_0``, ``q5_1``, ``q8_0``); ``None`` keeps them F16 unless they already are ``LinearGGUF``.
        tokenizer: Hugging Face source only: the tokenizer written into the file (a byte-level BPE).
        overwrite: replace an existing ``path``.
        log: notes (e.g. a tensor written in another type than the source's).
    Returns:
        :class:`GGUFWritten`.
    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: an architecture, tokenizer or tensor the writer cannot express (one line naming it); nothing is
            written.
    """
    import gguf

    path = Path(path)
    if source is None:
        source = gguf_source_of(model)
    if source is not None and gguf_type is not None:
        raise ValueError(f"--gguf-type applies to Hugging Face bases; {Path(source).name} keeps its own tensor types")
    if source is not None:
        from ..integrations.layouts.gguf import open_reader
        from transformers.modeling_gguf_pytorch_utils import read_field

        reader = open_reader(source)
        architecture = str(read_field(reader, "general.architecture")[0])
        permuting = False
        linear_cfg = None
    else:
        architecture, permuting = hf_architecture(model.config)
        linear_cfg = parse_gguf_type(gguf_type) if gguf_type is not None else None
    result = GGUFWritten(path=path, architecture=architecture)
    with atomic_file(path, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), architecture)
        try:
            if source is not None:
                _from_gguf(model, Path(source), reader, writer, result, log)
            else:
                _from_hf(model, writer, result, linear_cfg, tokenizer, permuting)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    result.path = path.absolute()
    return result
