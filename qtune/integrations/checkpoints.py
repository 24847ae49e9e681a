"""Read and write quantized checkpoints: qtune's own, transformers+bitsandbytes, and GPTQ (v1).

``load_model(path)`` dispatches on ``config.json``'s ``quantization_config``:

* ``quant_method: "qtune"``: ``from_pretrained`` through :class:`QTuneHfQuantizer` (no re-quantization).
* bitsandbytes (``load_in_4bit``: NF4/FP4 with or without double quant, any ``bnb_4bit_quant_storage``;
  ``load_in_8bit``): the bitsandbytes tensors become qtune ``Linear4bit`` / ``LinearLLMInt8`` buffers
  byte for byte (``weight``→``weight`` reshaped by row, ``weight.absmax``→``absmax``, ``weight.quant_map``→
  ``quant_map``, ``weight.nested_*``→``nested_*``, the quant-state JSON's ``nested_offset``→``nested_offset``;
  8-bit ``weight``/``SCB``). Every layer carrying a ``weight.quant_state.bitsandbytes__*`` (or ``SCB``)
  key is quantized, so the layer set is read from the tensors, not guessed from skip lists.
* GPTQ (``quant_method: "gptq"``, ``checkpoint_format`` ``gptq`` (v1) or ``gptq_v2``; any bits in
  {2, 3, 4, 8}, group size, ``desc_act``, ``sym``): ``qweight``/``qzeros``/``scales``/``g_idx`` become
  ``LinearGPTQ`` buffers (v2 zero points are re-packed as v1).
* no ``quantization_config`` and ``config=`` given: quantize on load.

Loading goes through ``from_pretrained`` (a lazily translated state dict: each tensor is read when
transformers materializes it).

Agreement with the original implementations (the qtune layer holds the very same bytes; measured on
CPU, fp32, and asserted by ``tests/integrations/test_checkpoints.py``):

* bitsandbytes NF4/FP4 (± double quant): logits identical to bitsandbytes' dequantize+matmul path
  (relative difference < 1e-5, 0.0 in practice). bitsandbytes' *eval-mode* CPU path repacks the weights
  for a fused kernel with lower-precision accumulation (~0.5% of the logits' scale on tiny models), and
  bitsandbytes 0.50.2's CPU ``dequantize_4bit`` is wrong when the block size exceeds ``in_features``;
  compare in train mode (no dropout) with block size ≤ ``in_features``.
* bitsandbytes 8-bit: identical int8 weights and ``SCB``, read as ``LLMInt8Config(arithmetic="bitsandbytes")``:
  bitsandbytes' own operations (activations cast to fp16 before the threshold test and the row
  quantization, its epilogue constants), which ``qtune.formats.int8.llm_int8_linear`` reproduces bit for
  bit (``tests/formats/test_int8.py``). qtune's own arithmetic (fp32 activations) differs by up to ~1e-2
  relative on LLM.int8 (threshold 6).
* GPTQ v1: ``W = scales[g_idx]·(q − z)`` with ``z`` decoded as GPTQModel decodes ``qzeros`` (``+1`` per
  field; a zero of 0, which GPTQModel writes with a whole-word borrow, reads right). Dequantized weights
  are bit-identical to GPTQModel 7.7's (its own checkpoints and qtune's, asserted in
  ``tests/integrations/test_gptqmodel_interop.py``), logits equal in fp32 (difference 0.0; the test allows
  1e-5) and within 3e-3 of the logits' scale against GPTQModel's own fp16 forward.

Writers (:func:`save_quantized`) produce ``layout="qtune"`` (``save_pretrained`` + ``quant_method:
"qtune"``), ``"bnb"`` (what transformers+bitsandbytes loads) and ``"gptq"`` (v1 tensors,
``quantize_config.json`` and ``config.json`` ``quantization_config``). Everything is written to a
temporary folder next to the destination and renamed into place, so a failure leaves nothing behind.

Only safetensors are read; ``trust_remote_code`` is off unless asked for. Errors are ``ValueError``
with one line naming the file, key or layer.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..formats import FP4Config, GPTQConfig, LLMInt8Config, NF4Config, QuantConfig, gptq, nf4
from ..formats.base import dtype_name, parse_dtype
from ..nn import Linear4bit, LinearGPTQ, LinearInt8, LinearLLMInt8, QuantLinear, linear_modules
from .transformers import QUANT_METHOD, SAFETENSORS_DTYPES, QTuneConfig, headers_by_key, mark_quantized

BNB_QS_PREFIX = "quant_state.bitsandbytes__"


# ------------------------------------------------------------------------------------------------
# Reading folders
# ------------------------------------------------------------------------------------------------
def read_config_json(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict (``ValueError`` naming the file when absent or invalid)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{file}: not found ({path} is not a Hugging Face model folder)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors weight files of a model folder (through ``model.safetensors.index.json`` if sharded).

    Raises:
        ValueError: no safetensors files (``.bin`` pickles are refused), or an index naming a missing shard.
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: invalid index ({type(e).__name__}: {e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index}: shard {f.name} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = f" (found {pickles[0]}: qtune reads safetensors only)" if pickles else ""
        raise ValueError(f"{path}: no .safetensors weights{extra}")
    return files


class LazyTensor:
    """A checkpoint tensor read (and translated) only when transformers materializes it (``t[...]``)."""

    def __init__(self, fn: Callable[[], torch.Tensor], dtype: str, shape: list[int]) -> None:
        self._fn, self._dtype, self._shape = fn, dtype, list(shape)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        t = self._fn()
        return t if idx is Ellipsis else t[idx]

    def get_dtype(self) -> str:
        return self._dtype

    def get_shape(self) -> list[int]:
        return list(self._shape)


class _Reader:
    """Reads single tensors from a set of safetensors files (one ``safe_open`` per file, opened lazily)."""

    def __init__(self, headers: dict[str, tuple[str, dict[str, Any]]]) -> None:
        self.headers = headers
        self._handles: dict[str, Any] = {}

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.headers[key][0]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt", device="cpu")
        try:
            return self._handles[file].get_tensor(key)
        except Exception as e:  # safetensors raises its own error type for corrupt data
            raise ValueError(f"{file}: cannot read key {key!r} ({type(e).__name__}: {e})") from None

    def lazy(self, key: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
             dtype: str | None = None, shape: list[int] | None = None) -> LazyTensor:
        entry = self.headers[key][1]
        fn = (lambda: self.get(key)) if transform is None else (lambda: transform(self.get(key)))
        return LazyTensor(fn, dtype or entry["dtype"], shape if shape is not None else entry["shape"])


def _shape(headers, key) -> tuple[int, ...]:
    return tuple(int(s) for s in headers[key][1]["shape"])


def _where(headers, key) -> str:
    return f"{headers[key][0]}: key {key!r}"


def _meta_skeleton(config, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _dims(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear``/``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    k, n = module.weight.shape  # Conv1D: [in, out]
    return int(n), int(k)


def _resolve_dtype(dtype: Any, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return parse_dtype(cfg_dtype) if cfg_dtype is not None else torch.float32
    return parse_dtype(dtype)


# ------------------------------------------------------------------------------------------------
# bitsandbytes -> qtune
# ------------------------------------------------------------------------------------------------
def _bnb_state_dict(headers, skeleton: nn.Module, qc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict]]:
    """Translate a bitsandbytes checkpoint: (lazy qtune state dict, ``{layer: format dict}``)."""
    reader = _Reader(headers)
    linears = dict(linear_modules(skeleton))
    compute = qc.get("bnb_4bit_compute_dtype") or "float32"
    compute = dtype_name(parse_dtype(str(compute)))
    state: dict[str, Any] = {}
    layers: dict[str, dict[str, Any]] = {}
    consumed: set[str] = set()

    order = {n: i for i, n in enumerate(linears)}
    qs_keys = sorted((k for k in headers if f".weight.{BNB_QS_PREFIX}" in k),
                     key=lambda k: order.get(k.split(".weight." + BNB_QS_PREFIX)[0], -1))
    for qs_key in qs_keys:
        name = qs_key.split(".weight." + BNB_QS_PREFIX)[0]
        where = _where(headers, qs_key)
        if name not in linears:
            raise ValueError(f"{where}: layer {name} is not a linear layer of {type(skeleton).__name__}")
        raw = reader.get(qs_key)
        try:
            qs = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: invalid bitsandbytes quant-state JSON ({e})") from None
        qtype = qs.get("quant_type")
        if qtype not in ("nf4", "fp4") or qs_key.rsplit("__", 1)[1] != qtype:
            raise ValueError(f"{where}: quant_type {qtype!r} does not match the key (expected nf4 or fp4)")
        n, k = _dims(linears[name])
        if [int(s) for s in qs.get("shape", [])] != [n, k]:
            raise ValueError(f"{where}: quant-state shape {qs.get('shape')} disagrees with layer {name} "
                             f"[out={n}, in={k}] of the model config")
        blocksize = int(qs.get("blocksize", 0))
        double_quant = f"{name}.weight.nested_absmax" in headers
        cls = NF4Config if qtype == "nf4" else FP4Config
        try:
            cfg = cls(blocksize=blocksize, double_quant=double_quant, compute_dtype=compute)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        nb = nf4.n_blocks((n, k), blocksize)
        # tensors, their expected shapes/dtypes
        wkey = f"{name}.weight"
        expect = {f"{wkey}.absmax": ((nb,), "U8" if double_quant else "F32"), f"{wkey}.quant_map": ((16,), "F32")}
        if double_quant:
            expect[f"{wkey}.nested_absmax"] = ((math.ceil(nb / nf4.NESTED_BLOCKSIZE),), "F32")
            expect[f"{wkey}.nested_quant_map"] = ((256,), "F32")
            if "nested_offset" not in qs:
                raise ValueError(f"{where}: double-quantized state without nested_offset")
        for key, (shape, dt) in expect.items():
            if key not in headers:
                raise ValueError(f"layer {name}: key {key!r} is missing from the checkpoint")
            if _shape(headers, key) != shape or headers[key][1]["dtype"] != dt:
                raise ValueError(f"{_where(headers, key)} is {headers[key][1]['dtype']} {list(_shape(headers, key))}, "
                                 f"expected {dt} {list(shape)} for blocksize {blocksize}")
        if wkey not in headers:
            raise ValueError(f"layer {name}: key {wkey!r} is missing from the checkpoint")
        wdt = SAFETENSORS_DTYPES.get(headers[wkey][1]["dtype"])
        nbytes = math.prod(_shape(headers, wkey)) * (wdt.itemsize if wdt else 0)
        if nbytes != (n * k + 1) // 2:
            raise ValueError(f"{_where(headers, wkey)} holds {nbytes} bytes, expected {(n * k + 1) // 2} packed "
                             f"4-bit bytes for [{n}, {k}]")
        layout = nf4.packed_layout((n, k), blocksize)
        state[f"{name}.weight"] = reader.lazy(
            wkey, lambda t, layout=layout: t.contiguous().view(torch.uint8).reshape(layout), dtype="U8", shape=list(layout))
        state[f"{name}.absmax"] = reader.lazy(f"{wkey}.absmax")
        state[f"{name}.quant_map"] = reader.lazy(f"{wkey}.quant_map")
        if double_quant:
            state[f"{name}.nested_absmax"] = reader.lazy(f"{wkey}.nested_absmax")
            state[f"{name}.nested_quant_map"] = reader.lazy(f"{wkey}.nested_quant_map")
            offset = float(qs["nested_offset"])
            state[f"{name}.nested_offset"] = LazyTensor(lambda o=offset: torch.tensor(o, dtype=torch.float32), "F32", [])
        consumed.update([wkey, qs_key, *expect])
        layers[name] = cfg.to_dict()

    scb_keys = sorted((k for k in headers if k.endswith(".SCB")), key=lambda k: order.get(k.removesuffix(".SCB"), -1))
    threshold = float(qc.get("llm_int8_threshold", 6.0))
    for scb in scb_keys:
        name = scb.removesuffix(".SCB")
        if name not in linears:
            raise ValueError(f"{_where(headers, scb)}: layer {name} is not a linear layer of {type(skeleton).__name__}")
        n, k = _dims(linears[name])
        wkey = f"{name}.weight"
        if wkey not in headers:
            raise ValueError(f"layer {name}: key {wkey!r} is missing from the checkpoint")
        if headers[wkey][1]["dtype"] != "I8" or _shape(headers, wkey) != (n, k):
            raise ValueError(f"{_where(headers, wkey)} is {headers[wkey][1]['dtype']} {list(_shape(headers, wkey))}, "
                             f"expected I8 [{n}, {k}] for layer {name}")
        if _shape(headers, scb) != (n,) or headers[scb][1]["dtype"] != "F32":
            raise ValueError(f"{_where(headers, scb)} is {headers[scb][1]['dtype']} {list(_shape(headers, scb))}, "
                             f"expected F32 [{n}]")
        fmt_key = f"{name}.weight_format"
        if fmt_key in headers:
            fmt = reader.get(fmt_key)
            if fmt.numel() != 1 or int(fmt.reshape(-1)[0]) != 0:
                raise ValueError(f"{_where(headers, fmt_key)}: weight_format {fmt.tolist()} is not supported "
                                 "(only row-major, 0)")
            consumed.add(fmt_key)
        state[wkey] = reader.lazy(wkey)
        state[f"{name}.SCB"] = reader.lazy(scb)
        consumed.update([wkey, scb])
        layers[name] = LLMInt8Config(threshold=threshold, compute_dtype=None, arithmetic="bitsandbytes").to_dict()

    if not layers:
        raise ValueError("config.json says bitsandbytes, but no tensor carries a bitsandbytes quant state "
                         "(weight.quant_state.bitsandbytes__* or SCB): quantization_config disagrees with the tensors")
    want_4bit = bool(qc.get("load_in_4bit"))
    if want_4bit != bool(qs_keys):
        raise ValueError(f"config.json says load_in_4bit={want_4bit} but the checkpoint holds "
                         f"{'4-bit' if qs_keys else '8-bit'} tensors: quantization_config disagrees with the tensors")
    for key in headers:
        if key not in consumed:
            state[key] = reader.lazy(key)
    return state, layers


# ------------------------------------------------------------------------------------------------
# GPTQ -> qtune
# ------------------------------------------------------------------------------------------------
def _repack_v2_zeros(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return gptq.pack_zeros(gptq.unpack_rows(qzeros.T.contiguous(), bits, n).T, bits)  # v2 stores the zero itself


def _gptq_state_dict(headers, skeleton: nn.Module, qc: dict[str, Any], compute: str | None) -> tuple[dict[str, Any], dict[str, dict]]:
    reader = _Reader(headers)
    linears = dict(linear_modules(skeleton))
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    try:
        bits = int(qc["bits"])
        group_size = int(qc.get("group_size", 128))
        cfg = GPTQConfig(bits=bits, group_size=group_size, desc_act=bool(qc.get("desc_act", False)),
                         sym=bool(qc.get("sym", True)), static_groups=bool(qc.get("static_groups", False)),
                         compute_dtype=compute)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.json quantization_config: invalid GPTQ settings ({type(e).__name__}: {e})") from None
    state: dict[str, Any] = {}
    layers: dict[str, dict[str, Any]] = {}
    consumed: set[str] = set()
    order = {n: i for i, n in enumerate(linears)}
    qkeys = sorted((k for k in headers if k.endswith(".qweight")), key=lambda k: order.get(k.removesuffix(".qweight"), -1))
    for qkey in qkeys:
        name = qkey.removesuffix(".qweight")
        if name not in linears:
            raise ValueError(f"{_where(headers, qkey)}: layer {name} is not a linear layer of {type(skeleton).__name__}")
        n, k = _dims(linears[name])
        g = 1 if group_size == -1 else math.ceil(k / group_size)
        expect = {
            qkey: ((math.ceil(k / 32) * bits, n), ("I32",)),
            f"{name}.qzeros": ((g, math.ceil(n / 32) * bits), ("I32",)),
            f"{name}.scales": ((g, n), ("F16", "BF16", "F32")),
            f"{name}.g_idx": ((k,), ("I32", "I64")),
        }
        for key, (shape, dts) in expect.items():
            if key not in headers:
                if key.endswith(".g_idx"):
                    continue  # some writers omit g_idx without act-order: k // group_size is implied
                raise ValueError(f"layer {name}: key {key!r} is missing from the checkpoint")
            if _shape(headers, key) != shape or headers[key][1]["dtype"] not in dts:
                raise ValueError(f"{_where(headers, key)} is {headers[key][1]['dtype']} {list(_shape(headers, key))}, "
                                 f"expected {dts[0]} {list(shape)} for bits={bits}, group_size={group_size} "
                                 f"(quantization_config disagrees with the tensors)")
        state[qkey] = reader.lazy(qkey)
        zkey = f"{name}.qzeros"
        if fmt == "gptq_v2":
            state[zkey] = reader.lazy(zkey, lambda t, n=n: _repack_v2_zeros(t, bits, n))
        else:
            state[zkey] = reader.lazy(zkey, lambda t, n=n: gptq.qzeros_from_checkpoint(t, bits, n))
        state[f"{name}.scales"] = reader.lazy(f"{name}.scales", lambda t: t.to(torch.float16), dtype="F16")
        gkey = f"{name}.g_idx"
        if gkey in headers:
            def load_gidx(t, nm=name, gk=gkey, g=g):
                t = t.to(torch.int32)
                if t.numel() and (int(t.min()) < 0 or int(t.max()) >= g):
                    raise ValueError(f"{_where(headers, gk)}: g_idx values out of range [0, {g}) for layer {nm}")
                return t
            state[gkey] = reader.lazy(gkey, load_gidx, dtype="I32")
        else:
            gs = k if group_size == -1 else group_size
            state[gkey] = LazyTensor(lambda k=k, gs=gs: (torch.arange(k) // gs).to(torch.int32), "I32", [k])
        consumed.update(expect)
        layers[name] = cfg.to_dict()
    if not layers:
        raise ValueError("config.json says gptq, but no tensor named *.qweight was found: "
                         "quantization_config disagrees with the tensors")
    for key in headers:
        if key not in consumed:
            state[key] = reader.lazy(key)
    return state, layers


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def _as_qtune_config(config: Any) -> QTuneConfig:
    if isinstance(config, QTuneConfig):
        return config
    if isinstance(config, QuantConfig):
        d = config.to_dict()
        return QTuneConfig(d.pop("format"), compute_dtype=d.pop("compute_dtype", None), **d)
    if isinstance(config, str):
        return QTuneConfig(config)
    if isinstance(config, dict):
        d = dict(config)
        return QTuneConfig(d.pop("format", "nf4"), **d)
    raise TypeError(f"config must be a QTuneConfig, a qtune QuantConfig, a format name or a dict, got {type(config).__name__}")


def bnb_kind(qc: dict[str, Any]) -> str | None:
    """``"4bit"``/``"8bit"`` for a bitsandbytes ``quantization_config`` dict, else ``None``."""
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        return "4bit"
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return "8bit"
    if str(qc.get("quant_method", "")).startswith("bitsandbytes"):
        raise ValueError("bitsandbytes quantization_config with neither load_in_4bit nor load_in_8bit")
    return None


def load_model(path: str | Path, config: Any = None, *, dtype: Any = "auto", device_map: Any = None,
               trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """Load a causal LM with qtune layers from a local folder.

    Args:
        path: model folder (``config.json`` + safetensors).
        config: for a float checkpoint, the quantization to apply while loading (``QTuneConfig``, a qtune
            ``QuantConfig``, a format name or a dict); must be ``None`` for an already quantized folder.
        dtype: dtype of the float parameters (``"auto"``: ``config.json``'s ``dtype``, else fp32).
        device_map: passed to ``from_pretrained``.
        trust_remote_code: only when asked for.
        kwargs: more ``from_pretrained`` arguments.
    Returns:
        The model (``eval()`` mode) with qtune ``QuantLinear`` layers.
    Raises:
        ValueError: missing/corrupt files, unsupported or inconsistent quantization_config (one line
            naming the file/key/layer).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = read_config_json(path)
    files = [str(f) for f in safetensors_files(path)]
    headers = headers_by_key(files)  # header + size checks of every file before anything is built
    qc = raw.get("quantization_config")
    common = dict(device_map=device_map, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs)
    if qc is None:
        if config is None:
            raise ValueError(f"{path / 'config.json'}: the model is not quantized; pass config= (e.g. "
                             "QTuneConfig(format='nf4')) to quantize it while loading")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=_as_qtune_config(config), dtype=dtype,
                                                    **common)
    if not isinstance(qc, dict):
        raise ValueError(f"{path / 'config.json'}: quantization_config must be a JSON object")
    if config is not None:
        raise ValueError(f"{path}: already quantized ({qc.get('quant_method')}); it cannot be re-quantized on load "
                         "(drop config=)")
    method = str(qc.get("quant_method", ""))
    if method == QUANT_METHOD:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common)
    kind = bnb_kind(qc)
    if kind is None and method != "gptq":
        raise ValueError(f"{path / 'config.json'}: quant_method {method!r} is not supported "
                         "(qtune, bitsandbytes, gptq)")
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    del hf_config.quantization_config
    torch_dtype = _resolve_dtype(dtype, hf_config)
    skeleton = _meta_skeleton(hf_config, trust_remote_code)
    if kind is not None:
        state, layers = _bnb_state_dict(headers, skeleton, qc)
    else:
        state, layers = _gptq_state_dict(headers, skeleton, qc, compute=None)
    for name, d in layers.items():
        if d.get("compute_dtype") is None:
            d["compute_dtype"] = dtype_name(torch_dtype)
    first = next(iter(layers.values()))
    qconfig = QTuneConfig(first["format"], compute_dtype=first["compute_dtype"], layers=layers,
                          **{k: v for k, v in first.items() if k not in ("format", "compute_dtype")})
    hf_config.quantization_config = qconfig.to_dict()
    model_class = type(skeleton)
    del skeleton
    common.pop("trust_remote_code")
    model = model_class.from_pretrained(None, config=hf_config, state_dict=state, dtype=torch_dtype, **common)
    model.name_or_path = str(path)
    with contextlib.suppress(OSError, ValueError):
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``QuantLinear`` by an ``nn.Linear`` (or ``Conv1D``) holding its dequantized weight."""
    from transformers.pytorch_utils import Conv1D

    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        w = m.dequantize(dtype or m.compute_dtype)
        if m.from_conv1d:
            new = Conv1D(m.out_features, m.in_features)
            new.weight = nn.Parameter(w.t().contiguous())
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
            new.weight = nn.Parameter(w)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().to(w.dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it is renamed to ``out``, on error removed.

    Raises:
        FileExistsError: ``out`` exists and is not empty, and ``overwrite`` is False.
    """
    out = Path(out).absolute()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if out.exists():
        backup = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except OSError:
        if backup is not None:
            os.replace(backup, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of everything except the quantized layers, without tied duplicates."""
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    out = {}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quant or key in tied:
            continue
        out[key] = t.detach().contiguous()
    return out


def _config_dict(model: nn.Module, quantization_config: dict[str, Any] | None) -> dict[str, Any]:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    return cfg


def _save_tensors(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _unique(values: set, what: str) -> Any:
    if len(values) != 1:
        raise ValueError(f"{what}: the layers disagree ({sorted(map(str, values))}); this layout needs one setting")
    return next(iter(values))


def bnb_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's state dict in bitsandbytes layout and its ``quantization_config``.

    Raises:
        ValueError: a layer bitsandbytes cannot represent (GPTQ, grouped or zero-point int8, mixed 4/8 bit).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layers to write in bitsandbytes layout")
    four = {n: m for n, m in layers.items() if isinstance(m, Linear4bit)}
    eight = {n: m for n, m in layers.items() if isinstance(m, (LinearLLMInt8, LinearInt8))}
    bad = [n for n in layers if n not in four and n not in eight]
    if bad or (four and eight):
        what = f"layer {bad[0]} is {layers[bad[0]].config.format}" if bad else "4-bit and 8-bit layers are mixed"
        raise ValueError(f"bitsandbytes layout: {what}; it holds NF4/FP4 or 8-bit absmax per row only")
    tensors = _float_state_dict(model)
    skip = sorted(n for n, _ in linear_modules(model))
    if four:
        qtype = _unique({m.quant_type for m in four.values()}, "bnb_4bit_quant_type")
        dq = _unique({m.nested_absmax is not None for m in four.values()}, "bnb_4bit_use_double_quant")
        compute = _unique({m.compute_dtype for m in four.values()}, "bnb_4bit_compute_dtype")
        for name, m in four.items():
            p = f"{name}.weight"
            tensors[p] = m.weight.detach().reshape(-1, 1).contiguous()
            tensors[f"{p}.absmax"] = m.absmax.detach().clone()
            tensors[f"{p}.quant_map"] = m.quant_map.detach().clone()
            qs = {"quant_type": m.quant_type, "blocksize": m.blocksize, "dtype": dtype_name(m.compute_dtype),
                  "shape": [m.out_features, m.in_features]}
            if dq:
                tensors[f"{p}.nested_absmax"] = m.nested_absmax.detach().clone()
                tensors[f"{p}.nested_quant_map"] = m.nested_quant_map.detach().clone()
                qs.update(nested_blocksize=nf4.NESTED_BLOCKSIZE, nested_dtype="float32",
                          nested_offset=float(m.nested_offset.item()))
            tensors[f"{p}.{BNB_QS_PREFIX}{m.quant_type}"] = torch.tensor(list(json.dumps(qs).encode("utf-8")),
                                                                         dtype=torch.uint8)
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.detach()
        qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
              "bnb_4bit_quant_type": qtype, "bnb_4bit_use_double_quant": dq,
              "bnb_4bit_compute_dtype": dtype_name(compute), "bnb_4bit_quant_storage": "uint8",
              "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
              "llm_int8_enable_fp32_cpu_offload": False}
        bs = {m.blocksize for m in four.values()}
        if bs != {64}:
            # transformers' BitsAndBytesConfig has no blocksize field; the quant state carries it per layer
            _unique(bs, "blocksize")
        return tensors, qc
    thresholds = set()
    for name, m in eight.items():
        if isinstance(m, LinearInt8) and (m.zero is not None or m.group_size != -1):
            raise ValueError(f"bitsandbytes layout: layer {name} is int8 with zero-point or groups; "
                             "bitsandbytes 8-bit holds symmetric per-row absmax only")
        scb = m.SCB if isinstance(m, LinearLLMInt8) else m.scale[:, 0]
        tensors[f"{name}.weight"] = m.weight.detach().contiguous()
        tensors[f"{name}.SCB"] = scb.detach().float().contiguous()
        tensors[f"{name}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach()
        thresholds.add(float(m.threshold) if isinstance(m, LinearLLMInt8) else 0.0)
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True,
          "llm_int8_threshold": _unique(thresholds, "llm_int8_threshold"), "llm_int8_skip_modules": skip,
          "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
          "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32",
          "bnb_4bit_quant_storage": "uint8"}
    return tensors, qc


def gptq_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's state dict in GPTQ v1 layout and its ``quantization_config`` (also ``quantize_config.json``).

    Raises:
        ValueError: a non-GPTQ layer, or layers with different bits/group size/act-order/symmetry.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    bad = [n for n, m in layers.items() if not isinstance(m, LinearGPTQ)]
    if not layers or bad:
        raise ValueError(f"GPTQ layout: layer {bad[0]} is {layers[bad[0]].config.format}, not gptq/rtn" if bad
                         else f"{type(model).__name__} has no quantized layers to write in GPTQ layout")
    cfgs = [m.config for m in layers.values()]
    bits = _unique({c.bits for c in cfgs}, "bits")
    group_size = _unique({c.group_size for c in cfgs}, "group_size")
    sym = _unique({c.sym for c in cfgs}, "sym")
    desc_act = _unique({bool(getattr(c, "desc_act", False)) for c in cfgs}, "desc_act")
    static = _unique({bool(getattr(c, "static_groups", False)) for c in cfgs}, "static_groups")
    damp = _unique({float(getattr(c, "damp_percent", 0.01)) for c in cfgs}, "damp_percent")
    true_seq = _unique({bool(getattr(c, "true_sequential", True)) for c in cfgs}, "true_sequential")
    if group_size != -1:
        for name, m in layers.items():
            if m.in_features % group_size:
                raise ValueError(f"GPTQ layout: layer {name}: group_size {group_size} does not divide in_features "
                                 f"{m.in_features} (GPTQ loaders' kernels need whole groups); save with layout='qtune'")
    tensors = _float_state_dict(model)
    for name, m in layers.items():
        tensors[f"{name}.qweight"] = m.qweight.detach()
        tensors[f"{name}.qzeros"] = gptq.qzeros_to_checkpoint(m.qzeros.detach(), m.bits, m.out_features)
        tensors[f"{name}.scales"] = m.scales.detach().to(torch.float16)
        tensors[f"{name}.g_idx"] = m.g_idx.detach().to(torch.int32)
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(torch.float16)
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
          "static_groups": static, "true_sequential": true_seq, "damp_percent": damp,
          "checkpoint_format": "gptq", "pack_dtype": "int32", "quantizer": [f"qtune:{_version()}"],
          "modules_in_block_to_quantize": None}
    return tensors, qc


def _version() -> str:
    from .. import __version__
    return __version__


def save_quantized(model: nn.Module, out: str | Path, *, layout: str = "qtune", tokenizer: Any = None,
                   overwrite: bool = False) -> Path:
    """Write a quantized model folder atomically (temporary folder, then rename).

    Args:
        model: a transformers model with qtune layers.
        out: destination folder (must not exist or be empty unless ``overwrite``).
        layout: ``"qtune"`` (qtune buffers, ``quant_method: "qtune"``), ``"bnb"`` (transformers+bitsandbytes),
            or ``"gptq"`` (GPTQ v1).
        tokenizer: saved alongside when given.
    Returns:
        The destination path.
    """
    if layout not in ("qtune", "bnb", "gptq"):
        raise ValueError(f"layout={layout!r} is not one of 'qtune', 'bnb', 'gptq'")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if layout == "qtune":
            if getattr(model, "hf_quantizer", None) is None or getattr(getattr(model, "hf_quantizer", None),
                                                                       "quantization_config", None) is None \
                    or getattr(model.hf_quantizer.quantization_config, "quant_method", None) != QUANT_METHOD:
                mark_quantized(model)
            model.save_pretrained(tmp)
        else:
            tensors, qc = bnb_tensors(model) if layout == "bnb" else gptq_tensors(model)
            _save_tensors(tensors, tmp)
            _write_json(tmp / "config.json", _config_dict(model, qc))
            if layout == "gptq":
                _write_json(tmp / "quantize_config.json", {k: v for k, v in qc.items() if k != "quant_method"})
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                with contextlib.suppress(Exception):
                    gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


__all__ = ["load_model", "save_quantized", "dequantize_model", "bnb_tensors", "gptq_tensors", "atomic_output_dir",
           "safetensors_files", "read_config_json", "LazyTensor"]
