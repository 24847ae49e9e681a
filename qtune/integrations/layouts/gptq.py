"""GPTQ checkpoints (``quant_method: "gptq"``, ``checkpoint_format`` ``gptq`` (v1) or ``gptq_v2``).

Reading: any bits in {2, 3, 4, 8}, group size, ``desc_act``, ``sym``; ``qweight``/``qzeros``/``scales``/
``g_idx`` become ``LinearGPTQ`` buffers (v2 zero points are re-packed as v1). ``W = scales[g_idx]·(q − z)``
with ``z`` decoded as GPTQModel decodes ``qzeros`` (``+1`` per field; a zero of 0, which GPTQModel writes
with a whole-word borrow, reads right). Dequantized weights are bit-identical to GPTQModel 7.7's (its own
checkpoints and qtune's, asserted in ``tests/integrations/test_gptqmodel_interop.py``), logits equal in fp32
(difference 0.0; the test allows 1e-5) and within 3e-3 of the logits' scale against GPTQModel's own fp16
forward.

Writing (:func:`gptq_tensors`): v1 tensors, ``quantize_config.json`` and ``config.json``
``quantization_config``. ``desc_act`` there describes the layout, not how the codes were found: it is true only
when some layer's ``g_idx`` is not ``k // group_size`` (classic act-order, ``static_groups=False``), so that
GPTQModel, AutoGPTQ, exllama and Marlin readers take their no-act-order path (no ``g_idx`` gather or input
permutation) for qtune's default, act-order with static groups, whose ``g_idx`` is trivial. How the codes were
found is recorded apart, as GPTQModel records ``act_group_aware``: ``static_groups: true`` (some layer used
act-order with static groups) and ``act_group_aware: true`` (some layer used group-aware order). Reading a file
qtune wrote (``quantizer`` ``qtune:...``), ``static_groups: true`` gives back ``desc_act=True,
static_groups=True``; in other writers' files (AutoGPTQ, GPTQModel) ``static_groups`` also applies without
``desc_act``, so there the fields are read as they stand.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ...formats import GPTQConfig, QuantConfig, RTNConfig, gptq
from ...nn import LinearGPTQ, float_weight_of, linear_modules
from ..safetensors_header import Headers, LazyTensor, TensorReader, header_shape, key_where
from .base import Layout, dims, float_state_dict, quantized_layers, register_layout, translated_reader, unique, \
    write_json, write_translated

QUANT_METHOD = "gptq"


def can_store(cfg: QuantConfig) -> bool:
    """GPTQ and round-to-nearest layers (both ``LinearGPTQ``: packed ints, scales, zeros, ``g_idx``)."""
    return isinstance(cfg, (GPTQConfig, RTNConfig))


def check_plan(model: nn.Module, plan: Mapping[str, QuantConfig]) -> None:
    """The GPTQ layout needs ``group_size`` to divide every layer's ``in_features``: GPTQ loaders' kernels
    (ExLlama, Marlin) assume whole groups. qtune's own layout and kernels accept a partial last group.

    Raises:
        ValueError: naming the first layer where it does not.
    """
    for name, cfg in plan.items():
        gs = getattr(cfg, "group_size", -1)
        if can_store(cfg) and gs != -1:
            weight, _ = float_weight_of(model.get_submodule(name), name)
            k = weight.shape[1]
            if k % gs:
                raise ValueError(f"layer {name}: group_size {gs} does not divide in_features {k} (the GPTQ layout "
                                 "needs whole groups; the qtune layout accepts a partial last group)")


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def _ordering(qc: Mapping[str, Any]) -> dict[str, bool]:
    """``desc_act``, ``static_groups``, ``act_group_aware`` of a ``quantization_config`` as :class:`GPTQConfig`
    fields (GPTQModel keeps the last two under ``meta``). qtune writes ``desc_act`` for the layout and
    ``static_groups`` for act-order with static groups, so in its files ``static_groups`` implies ``desc_act``."""
    meta = qc.get("meta") if isinstance(qc.get("meta"), Mapping) else {}
    static = bool(qc.get("static_groups", meta.get("static_groups", False)))
    group_aware = bool(qc.get("act_group_aware", meta.get("act_group_aware", False)))
    by_qtune = any(str(q).startswith("qtune:") for q in (qc.get("quantizer") or ()))
    desc_act = bool(qc.get("desc_act", False)) or (static and by_qtune)
    return {"desc_act": desc_act, "static_groups": static, "act_group_aware": group_aware}


def _repack_v2_zeros(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return gptq.pack_zeros(gptq.unpack_rows(qzeros.T.contiguous(), bits, n).T, bits)  # v2 stores the zero itself


def translate(headers: Headers, skeleton: nn.Module,
              qc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict], set[str]]:
    reader = TensorReader(headers)
    linears = dict(linear_modules(skeleton))
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    try:
        bits = int(qc["bits"])
        group_size = int(qc.get("group_size", 128))
        cfg = GPTQConfig(bits=bits, group_size=group_size, sym=bool(qc.get("sym", True)), **_ordering(qc),
                         compute_dtype=None)
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
            raise ValueError(f"{key_where(headers, qkey)}: layer {name} is not a linear layer of {type(skeleton).__name__}")
        n, k = dims(linears[name])
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
            if header_shape(headers, key) != shape or headers[key][1]["dtype"] not in dts:
                raise ValueError(f"{key_where(headers, key)} is {headers[key][1]['dtype']} {list(header_shape(headers, key))}, "
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
                    raise ValueError(f"{key_where(headers, gk)}: g_idx values out of range [0, {g}) for layer {nm}")
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
    return state, layers, consumed


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def gptq_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's state dict in GPTQ v1 layout and its ``quantization_config`` (also ``quantize_config.json``).

    Raises:
        ValueError: a non-GPTQ layer, layers with different bits/group size/symmetry/damping/true_sequential, or
            a group size that does not divide a layer's ``in_features``.
    """
    layers = quantized_layers(model)
    bad = [n for n, m in layers.items() if not isinstance(m, LinearGPTQ)]
    if not layers or bad:
        raise ValueError(f"GPTQ layout: layer {bad[0]} is {layers[bad[0]].config.format}, not gptq/rtn" if bad
                         else f"{type(model).__name__} has no quantized layers to write in GPTQ layout")
    cfgs = [m.config for m in layers.values()]
    bits = unique({c.bits for c in cfgs}, "bits")
    group_size = unique({c.group_size for c in cfgs}, "group_size")
    sym = unique({c.sym for c in cfgs}, "sym")
    damp = unique({float(getattr(c, "damp_percent", 0.01)) for c in cfgs}, "damp_percent")
    true_seq = unique({bool(getattr(c, "true_sequential", True)) for c in cfgs}, "true_sequential")
    # desc_act says how to read the tensors (a permuted g_idx somewhere); the orderings whose g_idx stays
    # k // group_size are recorded apart, as GPTQModel records act_group_aware (see the module docstring)
    desc_act = any(not _trivial_g_idx(m, group_size) for m in layers.values())
    orderings = {c.ordering for c in cfgs if isinstance(c, GPTQConfig)}
    static = "act-order-static" in orderings
    group_aware = "group-aware" in orderings
    if group_size != -1:
        for name, m in layers.items():
            if m.in_features % group_size:
                raise ValueError(f"GPTQ layout: layer {name}: group_size {group_size} does not divide in_features "
                                 f"{m.in_features} (GPTQ loaders' kernels need whole groups); save with layout='qtune'")
    tensors = float_state_dict(model)
    for name, m in layers.items():
        tensors[f"{name}.qweight"] = m.qweight.detach()
        tensors[f"{name}.qzeros"] = gptq.qzeros_to_checkpoint(m.qzeros.detach(), m.bits, m.out_features)
        tensors[f"{name}.scales"] = m.scales.detach().to(torch.float16)
        tensors[f"{name}.g_idx"] = m.g_idx.detach().to(torch.int32)
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(torch.float16)
    qc = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
          "static_groups": static, "act_group_aware": group_aware, "true_sequential": true_seq,
          "damp_percent": damp,
          "checkpoint_format": "gptq", "pack_dtype": "int32", "quantizer": [f"qtune:{_version()}"],
          "modules_in_block_to_quantize": None}
    return tensors, qc


def _trivial_g_idx(m: LinearGPTQ, group_size: int) -> bool:
    """``g_idx == k // group_size``: the layer reads without act-order's gather."""
    gs = m.in_features if group_size == -1 else group_size
    return bool(torch.equal(m.g_idx.long().cpu(), torch.arange(m.in_features) // gs))


def declares(qc: dict[str, Any]) -> dict[str, Any]:
    """The qtune format a GPTQ ``quantization_config`` declares."""
    return {"format": GPTQConfig.format, "bits": int(qc.get("bits", 4)), "group_size": int(qc.get("group_size", 128)),
            **_ordering(qc), "sym": bool(qc.get("sym", True))}


def _describe(qc: dict[str, Any]) -> str:
    order = _ordering(qc)
    act = (", act-order, static groups" if order["static_groups"] else ", act-order") if order["desc_act"] else ""
    return f"{qc.get('bits')}-bit, group size {qc.get('group_size')}" + act


def _version() -> str:
    # the installed distribution's version (qtune.__version__ would import the package that imports this module)
    import importlib.metadata

    try:
        return importlib.metadata.version("qtune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write(model: nn.Module, folder: Path) -> None:
    """Write ``model`` in GPTQ v1 layout into ``folder`` (also ``quantize_config.json``)."""
    tensors, qc = gptq_tensors(model)
    write_translated(model, folder, tensors, qc)
    write_json(folder / "quantize_config.json", {k: v for k, v in qc.items() if k != "quant_method"})


LAYOUT = register_layout(Layout(name="gptq", quant_method=QUANT_METHOD, holds="gptq/rtn layers", can_store=can_store,
                                detects=lambda qc: str(qc.get("quant_method", "")) == QUANT_METHOD,
                                read=translated_reader(translate), write=write, check_plan=check_plan,
                                describe=_describe, declares=declares,
                                note="GPTQ v1 layout (loads with GPTQ loaders such as GPTQModel, or "
                                     "`qtune.load_model`)"))

__all__ = ["LAYOUT", "can_store", "check_plan", "translate", "gptq_tensors", "write"]
