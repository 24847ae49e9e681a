"""GGUF files (llama.cpp) read as qtune models: the linear weights stay in their GGUF block type.

``qtune.load_model("model.gguf")`` builds the model as transformers' GGUF loader does, with two differences:

- config and tokenizer come from transformers' own GGUF conversion (``AutoConfig``/``AutoTokenizer
  .from_pretrained(folder, gguf_file=name)``), so every architecture transformers reads is described the same;
- each linear weight of a type qtune holds (:mod:`qtune.formats.gguf`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
  Q6_K) becomes a :class:`~qtune.nn.LinearGGUF` holding the file's bytes unchanged; every other tensor (norms,
  embeddings, F32/F16 weights) is dequantized by the ``gguf`` package into the model's float dtype, as
  transformers does.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for its rotary layout; transformers undoes it
(``LlamaTensorProcessor``). A row permutation moves whole rows of blocks, so the same numpy function applied to
the ``[N, bytes per row]`` block array undoes it exactly. Architectures whose transformers tensor processor does
more than that (Bloom's fused QKV, GPT-2's transposes, Gemma's norm offsets...) are refused for quantized linear
weights, naming the file and the architecture.

The result is the model ``qtune.load_model`` returns for a qtune folder (``quant_method: "qtune"``,
``QuantLinear`` layers, peft/trl/export ready); ``qtune.save_quantized(model, out)`` writes it in qtune's
layout. GGUF files are written by :func:`qtune.export.gguf.write_gguf` (``qtune export --mode quantized --format
gguf``), not through this layout (a GGUF export is one file, not a checkpoint folder): ``can_store`` is False.

Errors are ``ValueError`` with one line naming the file (and the tensor where there is one): a file the
``gguf`` package cannot parse (truncated, corrupt), a tensor whose data is cut short, a linear weight of a
type qtune has no layer for, a weight of the model with no tensor in the file (a misnamed or missing tensor).
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ...formats.base import dtype_name
from ...formats.gguf import GGUF_CONFIGS, config_for_ggml_type
from ..safetensors_header import Headers
from .base import Layout, _resolve_dtype, register_layout

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def is_gguf_path(path: str | Path) -> bool:
    """``path`` names a file ending in ``.gguf`` (any case)."""
    return str(path).lower().endswith(".gguf")


def open_reader(path: str | Path):
    """``gguf.GGUFReader`` of ``path``, every tensor's data checked for length.

    Raises:
        ValueError: missing file, a file the gguf package cannot parse, or a tensor cut short (named).
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (the reader raises ValueError, IndexError, struct/numpy errors...)
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ValueError(f"{path}: not a readable GGUF file ({first}); is it truncated or corrupt?") from None
    for t in reader.tensors:
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        expected = int(t.n_elements) // block * size
        if int(t.data.nbytes) != expected:
            raise ValueError(f"{path}: tensor {t.name} ({t.tensor_type.name}) holds {int(t.data.nbytes)} bytes, expected "
                             f"{expected}; the file is truncated or corrupt")
    return reader


def load_tokenizer(path: str | Path, **kwargs: Any):
    """The tokenizer stored in a GGUF file (transformers' GGUF conversion)."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)


def _hf_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, NotImplementedError, OSError, TypeError) as e:
        # a corrupt key/value section: transformers may fall back to reading the file as a JSON config (OSError)
        first = (f"{e}".splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: transformers cannot build a config from this GGUF file ({first}); is it corrupt?"
                         ) from None


def _processor(reader, hf_config):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

    architecture = read_field(reader, "general.architecture")[0]
    cls = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    return architecture, cls(config=hf_config.to_dict())


def _block_safe(processor) -> bool:
    """Whether the processor only renames or permutes rows, so it can run on quantized blocks."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, TensorProcessor

    return type(processor) in (TensorProcessor, LlamaTensorProcessor)


@contextlib.contextmanager
def cached_name_maps() -> Iterator[None]:
    """Memoize ``gguf.get_tensor_name_map`` while transformers' ``get_gguf_hf_weights_map`` runs.

    That function rebuilds the (pure, argument-determined) name map once per submodule (397 times, ~15 s for
    SmolLM2); the result is the same map, built once.
    """
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def translate(path: Path, reader, skeleton: nn.Module, processor, architecture: str,
              float_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The state dict (GGUF blocks under ``<layer>.weight`` for quantized layers, float tensors otherwise) and
    the ``{layer: format dict}`` map of a GGUF file, for the meta ``skeleton`` model."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with cached_name_maps():
        key_map = get_gguf_hf_weights_map(skeleton, processor)
    modules = dict(skeleton.named_modules())
    readable = ", ".join(c.type_name for c in GGUF_CONFIGS)
    state: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        qtype = t.tensor_type
        owner, _, leaf = (key_map.get(t.name) or "").rpartition(".")
        module = modules.get(owner)
        if isinstance(module, nn.Linear) and leaf == "weight" and qtype.name not in FLOAT_TYPES:
            cfg_cls = config_for_ggml_type(int(qtype))
            if cfg_cls is None:
                raise ValueError(f"{path}: tensor {t.name} has type {qtype.name}, which qtune does not hold as a "
                                 f"quantized layer (it reads {readable})")
            if not _block_safe(processor):
                raise ValueError(f"{path}: tensor {t.name}: transformers rewrites {architecture!r} tensors "
                                 f"({type(processor).__name__}); qtune keeps GGUF blocks only for architectures whose "
                                 "tensors need at most llama's row permutation")
            blocks = np.array(t.data, dtype=np.uint8)  # [N, K / block · bytes], copied out of the memory map
            result = processor.process(weights=blocks, name=t.name)
            hf_name = key_map[result.name]
            n, k = module.out_features, module.in_features
            if blocks.shape != (n, cfg_cls.row_bytes(k)) or int(t.shape[0]) != k:
                raise ValueError(f"{path}: tensor {t.name} has shape {[int(s) for s in t.shape]} ({qtype.name}), but "
                                 f"{hf_name} is [{n}, {k}] in the config the file describes")
            state[hf_name] = torch.from_numpy(np.ascontiguousarray(result.weights))
            layers[owner] = {"format": cfg_cls.format}
            continue
        try:
            weights = gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name} has type {qtype.name}, which the gguf package cannot "
                             "dequantize") from None
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=key_map,
                                   parsed_parameters={"tensors": state, "config": {}})
        if result.name not in key_map:  # transformers skips these too
            continue
        state[key_map[result.name]] = torch.from_numpy(np.copy(result.weights)).to(float_dtype)
    if not layers:
        raise ValueError(f"{path}: no linear weight is in a GGUF block type qtune reads ({readable})")
    # transformers would initialise a weight the file lacks at random; a model from a file with a missing or
    # misnamed tensor is refused instead (ties are one parameter here)
    missing = [n for n, _ in skeleton.named_parameters() if n not in state]
    if missing:
        raise ValueError(f"{path}: no tensor for {missing[0]} ({len(missing)} weights missing); the file is corrupt or "
                         "its tensor names are not the ones the gguf package gives this architecture")
    return state, layers


def read_file(path: str | Path, *, dtype: Any = "auto", kwargs: dict[str, Any] | None = None,
              auto_class: Any = None) -> nn.Module:
    """Load a GGUF file as a transformers model with :class:`~qtune.nn.LinearGGUF` layers.

    Args:
        path: the ``.gguf`` file.
        dtype: dtype of the float tensors and the layers' compute dtype (``"auto"``: the config's, else fp32).
        kwargs: more ``from_pretrained`` arguments (``device_map``, ``trust_remote_code``...).
        auto_class: the transformers auto class (default ``AutoModelForCausalLM``).
    Raises:
        ValueError: see the module docstring (one line naming the file and tensor).
    """
    from transformers import AutoModelForCausalLM

    from ..transformers import QTuneConfig

    path = Path(path)
    kwargs = dict(kwargs or {})
    kwargs.pop("use_safetensors", None)
    trust_remote_code = kwargs.pop("trust_remote_code", False)
    auto_class = auto_class or AutoModelForCausalLM
    reader = open_reader(path)
    hf_config = _hf_config(path, trust_remote_code)
    torch_dtype = _resolve_dtype(dtype, hf_config)
    with torch.device("meta"):
        skeleton = auto_class.from_config(hf_config, trust_remote_code=trust_remote_code)
    architecture, processor = _processor(reader, hf_config)
    state, layers = translate(path, reader, skeleton, processor, architecture, torch_dtype)
    for d in layers.values():
        d["compute_dtype"] = dtype_name(torch_dtype)
    first = next(iter(layers.values()))
    hf_config.quantization_config = QTuneConfig(first["format"], compute_dtype=first["compute_dtype"],
                                                layers=layers).to_dict()
    model_class = type(skeleton)
    del skeleton
    model = model_class.from_pretrained(None, config=hf_config, state_dict=state, dtype=torch_dtype, **kwargs)
    model.name_or_path = str(path)
    return model


def _read(path: Path, qc: dict[str, Any], headers: Headers, *, dtype: Any, kwargs: dict[str, Any],
          auto_class: Any) -> nn.Module:
    return read_file(path, dtype=dtype, kwargs=kwargs, auto_class=auto_class)


_REFUSAL = ("--layout gguf: a GGUF export is one file; write it with `qtune export --mode quantized --format gguf` "
            "or qtune.export.write_gguf(model, 'x.gguf')")


def _write(model: nn.Module, folder: Path) -> None:
    raise ValueError(_REFUSAL)


LAYOUT = register_layout(Layout(
    name="gguf", quant_method="", holds="nothing as a folder (GGUF files are written by `--format gguf`)",
    can_store=lambda cfg: False, detects=lambda qc: False, read=_read, write=_write,
    refusal=lambda cfg: _REFUSAL,
    claims_path=is_gguf_path, tokenizer=load_tokenizer,
    note="GGUF file (llama.cpp); load with `qtune.load_model(file.gguf)`"))

__all__ = ["LAYOUT", "is_gguf_path", "open_reader", "load_tokenizer", "read_file", "translate"]
