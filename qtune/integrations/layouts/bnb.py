"""transformers+bitsandbytes checkpoints (``quant_method: "bitsandbytes"``), read and written byte for byte.

Reading: the bitsandbytes tensors become qtune ``Linear4bit`` / ``LinearLLMInt8`` buffers byte for byte
(``weight``→``weight`` reshaped by row, ``weight.absmax``→``absmax``, ``weight.quant_map``→``quant_map``,
``weight.nested_*``→``nested_*``, the quant-state JSON's ``nested_offset``→``nested_offset``; 8-bit
``weight``/``SCB``), for NF4/FP4 with or without double quant and any ``bnb_4bit_quant_storage``
(``load_in_4bit``) and for ``load_in_8bit``. Every layer carrying a ``weight.quant_state.bitsandbytes__*``
(or ``SCB``) key is quantized, so the layer set is read from the tensors, not guessed from skip lists.

Agreement with bitsandbytes (the qtune layer holds the very same bytes; measured on CPU, fp32, asserted by
``tests/integrations/test_checkpoints.py``):

* NF4/FP4 (± double quant): logits identical to bitsandbytes' dequantize+matmul path (relative difference
  < 1e-5, 0.0 in practice). bitsandbytes' *eval-mode* CPU path repacks the weights for a fused kernel with
  lower-precision accumulation (~0.5% of the logits' scale on tiny models), and bitsandbytes 0.50.2's CPU
  ``dequantize_4bit`` is wrong when the block size exceeds ``in_features``; compare in train mode (no
  dropout) with block size ≤ ``in_features``.
* 8-bit: identical int8 weights and ``SCB``, read as ``LLMInt8Config(arithmetic="bitsandbytes")``:
  bitsandbytes' own operations (activations cast to fp16 before the threshold test and the row
  quantization, its epilogue constants), which ``qtune.formats.int8.llm_int8_linear`` reproduces bit for
  bit (``tests/formats/test_int8.py``). qtune's own arithmetic (fp32 activations) differs by up to ~1e-2
  relative on LLM.int8 (threshold 6).

Writing (:func:`bnb_tensors`): what transformers+bitsandbytes loads; NF4/FP4 or symmetric per-row 8-bit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...formats import FP4Config, Int8Config, LLMInt8Config, NF4Config, QuantConfig, nf4
from ...formats.base import dtype_name, parse_dtype
from ...nn import Linear4bit, LinearInt8, LinearLLMInt8, linear_modules
from ..safetensors_header import SAFETENSORS_DTYPES, Headers, LazyTensor, TensorReader, header_shape, key_where
from .base import Layout, dims, float_state_dict, quantized_layers, register_layout, translated_reader, unique, \
    write_translated

QUANT_METHOD = "bitsandbytes"
BNB_QS_PREFIX = "quant_state.bitsandbytes__"
# bitsandbytes' 4-bit quant_type names are qtune's format names
FOUR_BIT = {cls.format: cls for cls in (NF4Config, FP4Config)}


def can_store(cfg: QuantConfig) -> bool:
    """NF4/FP4, LLM.int8, and int8 with symmetric per-row absmax (bitsandbytes' 8-bit weights)."""
    if isinstance(cfg, Int8Config):
        return cfg.symmetric and cfg.group_size == -1
    return isinstance(cfg, (NF4Config, FP4Config, LLMInt8Config))


def _refusal(cfg: QuantConfig) -> str | None:
    if isinstance(cfg, Int8Config):
        return "--layout bnb holds symmetric per-row int8 only (int8:symmetric=true,group_size=-1)"
    return None


def stored_config(cfg: QuantConfig) -> QuantConfig:
    """bitsandbytes' 8-bit layer is LLM.int8(): symmetric per-row int8 weights are the same bytes, with the
    outlier decomposition at run time, and read back as ``LLMInt8Config(arithmetic="bitsandbytes")``; a model
    about to be written should compute as the reloaded one will."""
    if isinstance(cfg, Int8Config) and can_store(cfg):
        return LLMInt8Config(compute_dtype=cfg.compute_dtype, arithmetic="bitsandbytes")
    return cfg


def bnb_kind(qc: dict[str, Any]) -> str | None:
    """``"4bit"``/``"8bit"`` for a bitsandbytes ``quantization_config`` dict, else ``None``."""
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        return "4bit"
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return "8bit"
    if str(qc.get("quant_method", "")).startswith("bitsandbytes"):
        raise ValueError("bitsandbytes quantization_config with neither load_in_4bit nor load_in_8bit")
    return None


def declares(qc: dict[str, Any]) -> dict[str, Any]:
    """The qtune format a bitsandbytes ``quantization_config`` declares (bitsandbytes' own defaults: FP4 4-bit
    without double quantization; 8-bit is LLM.int8)."""
    if bnb_kind(qc) == "4bit":
        return {"format": qc.get("bnb_4bit_quant_type", FP4Config.format),
                "double_quant": bool(qc.get("bnb_4bit_use_double_quant", False))}
    return {"format": LLMInt8Config.format}


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def translate(headers: Headers, skeleton: nn.Module,
              qc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict], set[str]]:
    """Translate a bitsandbytes checkpoint: (lazy qtune tensors of its quantized layers, ``{layer: format dict}``,
    the checkpoint keys they used)."""
    reader = TensorReader(headers)
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
        where = key_where(headers, qs_key)
        if name not in linears:
            raise ValueError(f"{where}: layer {name} is not a linear layer of {type(skeleton).__name__}")
        raw = reader.get(qs_key)
        try:
            qs = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: invalid bitsandbytes quant-state JSON ({e})") from None
        qtype = qs.get("quant_type")
        if qtype not in FOUR_BIT or qs_key.rsplit("__", 1)[1] != qtype:
            raise ValueError(f"{where}: quant_type {qtype!r} does not match the key (expected nf4 or fp4)")
        n, k = dims(linears[name])
        if [int(s) for s in qs.get("shape", [])] != [n, k]:
            raise ValueError(f"{where}: quant-state shape {qs.get('shape')} disagrees with layer {name} "
                             f"[out={n}, in={k}] of the model config")
        blocksize = int(qs.get("blocksize", 0))
        double_quant = f"{name}.weight.nested_absmax" in headers
        cls = FOUR_BIT[qtype]
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
            if header_shape(headers, key) != shape or headers[key][1]["dtype"] != dt:
                raise ValueError(f"{key_where(headers, key)} is {headers[key][1]['dtype']} {list(header_shape(headers, key))}, "
                                 f"expected {dt} {list(shape)} for blocksize {blocksize}")
        if wkey not in headers:
            raise ValueError(f"layer {name}: key {wkey!r} is missing from the checkpoint")
        wdt = SAFETENSORS_DTYPES.get(headers[wkey][1]["dtype"])
        nbytes = math.prod(header_shape(headers, wkey)) * (wdt.itemsize if wdt else 0)
        if nbytes != (n * k + 1) // 2:
            raise ValueError(f"{key_where(headers, wkey)} holds {nbytes} bytes, expected {(n * k + 1) // 2} packed "
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
            raise ValueError(f"{key_where(headers, scb)}: layer {name} is not a linear layer of {type(skeleton).__name__}")
        n, k = dims(linears[name])
        wkey = f"{name}.weight"
        if wkey not in headers:
            raise ValueError(f"layer {name}: key {wkey!r} is missing from the checkpoint")
        if headers[wkey][1]["dtype"] != "I8" or header_shape(headers, wkey) != (n, k):
            raise ValueError(f"{key_where(headers, wkey)} is {headers[wkey][1]['dtype']} {list(header_shape(headers, wkey))}, "
                             f"expected I8 [{n}, {k}] for layer {name}")
        if header_shape(headers, scb) != (n,) or headers[scb][1]["dtype"] != "F32":
            raise ValueError(f"{key_where(headers, scb)} is {headers[scb][1]['dtype']} {list(header_shape(headers, scb))}, "
                             f"expected F32 [{n}]")
        fmt_key = f"{name}.weight_format"
        if fmt_key in headers:
            fmt = reader.get(fmt_key)
            if fmt.numel() != 1 or int(fmt.reshape(-1)[0]) != 0:
                raise ValueError(f"{key_where(headers, fmt_key)}: weight_format {fmt.tolist()} is not supported "
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
    return state, layers, consumed


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def bnb_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's state dict in bitsandbytes layout and its ``quantization_config``.

    Raises:
        ValueError: a layer bitsandbytes cannot represent (GPTQ, grouped or zero-point int8, mixed 4/8 bit).
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layers to write in bitsandbytes layout")
    four = {n: m for n, m in layers.items() if isinstance(m, Linear4bit)}
    eight = {n: m for n, m in layers.items() if isinstance(m, (LinearLLMInt8, LinearInt8))}
    bad = [n for n in layers if n not in four and n not in eight]
    if bad or (four and eight):
        what = f"layer {bad[0]} is {layers[bad[0]].config.format}" if bad else "4-bit and 8-bit layers are mixed"
        raise ValueError(f"bitsandbytes layout: {what}; it holds NF4/FP4 or 8-bit absmax per row only")
    tensors = float_state_dict(model)
    skip = sorted(n for n, _ in linear_modules(model))
    if four:
        qtype = unique({m.quant_type for m in four.values()}, "bnb_4bit_quant_type")
        dq = unique({m.nested_absmax is not None for m in four.values()}, "bnb_4bit_use_double_quant")
        compute = unique({m.compute_dtype for m in four.values()}, "bnb_4bit_compute_dtype")
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
        qc = {"quant_method": QUANT_METHOD, "load_in_4bit": True, "load_in_8bit": False,
              "bnb_4bit_quant_type": qtype, "bnb_4bit_use_double_quant": dq,
              "bnb_4bit_compute_dtype": dtype_name(compute), "bnb_4bit_quant_storage": "uint8",
              "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
              "llm_int8_enable_fp32_cpu_offload": False}
        bs = {m.blocksize for m in four.values()}
        if bs != {64}:
            # transformers' BitsAndBytesConfig has no blocksize field; the quant state carries it per layer
            unique(bs, "blocksize")
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
    qc = {"quant_method": QUANT_METHOD, "load_in_4bit": False, "load_in_8bit": True,
          "llm_int8_threshold": unique(thresholds, "llm_int8_threshold"), "llm_int8_skip_modules": skip,
          "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
          "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32",
          "bnb_4bit_quant_storage": "uint8"}
    return tensors, qc


def write(model: nn.Module, folder: Path) -> None:
    """Write ``model`` in bitsandbytes layout into ``folder``."""
    tensors, qc = bnb_tensors(model)
    write_translated(model, folder, tensors, qc)


LAYOUT = register_layout(Layout(name="bnb", quant_method=QUANT_METHOD, holds="nf4/fp4/int8/llm_int8 layers",
                                can_store=can_store, detects=lambda qc: bnb_kind(qc) is not None,
                                read=translated_reader(translate), write=write, refusal=_refusal,
                                stored_config=stored_config, declares=declares,
                                describe=lambda qc: (qc.get("bnb_4bit_quant_type") if qc.get("load_in_4bit")
                                                     else "LLM.int8"),
                                note="bitsandbytes layout (loads with transformers + bitsandbytes, or "
                                     "`qtune.load_model`)"))

__all__ = ["LAYOUT", "can_store", "stored_config", "bnb_kind", "translate", "bnb_tensors", "write"]
