"""Checkpoint layouts as plug-ins: qtune's own, transformers+bitsandbytes, GPTQ (v1/v2).

One module per layout, each with a reader, a writer and ``can_store(config)``, registered as a
:class:`Layout` record (:mod:`.base`). :func:`load_model`, :func:`save_quantized`, ``qtune quantize`` and
``qtune export`` ask the registry (:func:`get_layout`, :func:`detect_layout`, :func:`storing_layouts`);
a new layout is a new module calling :func:`register_layout`.

``load_model(path)`` dispatches on ``config.json``'s ``quantization_config``: each layout's ``detects``
claims it (``quant_method: "qtune"``: ``from_pretrained`` through the qtune quantizer, no re-quantization;
bitsandbytes and GPTQ: ``from_pretrained`` of a lazily translated state dict, each tensor read when
transformers materializes it); with no ``quantization_config`` and ``config=`` given, the float checkpoint
is quantized while it loads.

Only safetensors are read; ``trust_remote_code`` is off unless asked for. Errors are ``ValueError`` with one
line naming the file, key or layer. Writing goes to a temporary folder next to the destination, renamed
into place at the end (:func:`qtune.atomic.atomic_output`), so a failure leaves nothing behind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..safetensors_header import headers_by_key, safetensors_files
from . import qtune, bnb, gptq, gguf  # noqa: F401  (registers the layouts; detection and listing follow this order)
from .base import (Layout, detect_layout, get_layout, layout_claiming, layout_names, read_config_json,
                   register_layout, storing_layouts)
from .qtune import as_qtune_config


def load_model(path: str | Path, config: Any = None, *, dtype: Any = "auto", device_map: Any = None,
               trust_remote_code: bool = False, auto_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a causal LM (or another transformers model) with qtune layers from a local folder.

    Args:
        path: model folder (``config.json`` + safetensors), or a file a layout claims (``model.gguf``: its
            linear weights stay in their GGUF block types, see :mod:`.gguf`).
        config: for a float checkpoint, the quantization to apply while loading (``QTuneConfig``, a qtune
            ``QuantConfig``, a format name or a dict); must be ``None`` for an already quantized folder.
        dtype: dtype of the float parameters (``"auto"``: ``config.json``'s ``dtype``, else fp32).
        device_map: passed to ``from_pretrained``.
        trust_remote_code: only when asked for.
        auto_class: the transformers auto class of the model the folder holds (default
            ``AutoModelForCausalLM``; e.g. ``AutoModelForSequenceClassification`` for a reward model).
        kwargs: more ``from_pretrained`` arguments.
    Returns:
        The model (``eval()`` mode) with qtune ``QuantLinear`` layers.
    Raises:
        ValueError: missing/corrupt files, unsupported or inconsistent quantization_config (one line
            naming the file/key/layer).
    """
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    path = Path(path)
    common = dict(device_map=device_map, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs)
    own = layout_claiming(path)
    if own is not None:  # a file in a layout of its own (GGUF): its linear weights are already quantized
        if config is not None:
            raise ValueError(f"{path}: already quantized ({own.name}); it cannot be re-quantized on load (drop config=)")
        return own.read(path, {}, {}, dtype=dtype, kwargs=common, auto_class=auto_class)
    raw = read_config_json(path)
    headers = headers_by_key([str(f) for f in safetensors_files(path)])  # every file checked before anything is built
    qc = raw.get("quantization_config")
    if qc is None:
        if config is None:
            raise ValueError(f"{path / 'config.json'}: the model is not quantized; pass config= (e.g. "
                             "QTuneConfig(format='nf4')) to quantize it while loading")
        from ..transformers import CONVERSION_ERRORS

        CONVERSION_ERRORS.clear()
        try:
            return auto_class.from_pretrained(path, quantization_config=as_qtune_config(config), dtype=dtype, **common)
        except RuntimeError:
            if CONVERSION_ERRORS:  # transformers' generic conversion error: qtune's reason, one line, naming the tensor
                raise ValueError(f"{path}: {CONVERSION_ERRORS[0]}") from None
            raise
        finally:
            CONVERSION_ERRORS.clear()
    if not isinstance(qc, dict):
        raise ValueError(f"{path / 'config.json'}: quantization_config must be a JSON object")
    if config is not None:
        raise ValueError(f"{path}: already quantized ({qc.get('quant_method')}); it cannot be re-quantized on load "
                         "(drop config=)")
    layout = detect_layout(qc, where=str(path / "config.json"))
    return layout.read(path, qc, headers, dtype=dtype, kwargs=common, auto_class=auto_class)


def save_quantized(model: nn.Module, out: str | Path, *, layout: str = "qtune", tokenizer: Any = None,
                   overwrite: bool = False) -> Path:
    """Write a quantized model folder atomically (temporary folder, then rename).

    Args:
        model: a transformers model with qtune layers.
        out: destination folder (must not exist or be empty unless ``overwrite``).
        layout: a registered layout (:func:`layout_names`): ``"qtune"`` (qtune buffers, ``quant_method:
            "qtune"``), ``"bnb"`` (transformers+bitsandbytes) or ``"gptq"`` (GPTQ v1).
        tokenizer: saved alongside when given.
    Returns:
        The destination path.
    Raises:
        ValueError: unknown layout, or a layer the layout cannot hold (named).
        FileExistsError: ``out`` is occupied and ``overwrite`` is False.
    """
    from ...atomic import atomic_output  # the one atomic-folder helper

    from ...nn.experts import QuantExperts

    writer = get_layout(layout)
    from ...nn import QuantLinear

    for name, m in model.named_modules():  # float offsets: refused, naming the layer, before anything is written
        if isinstance(m, QuantLinear) and getattr(m.config, "float_offset", False) and not writer.can_store(m.config):
            try:
                writer.check(m.config)
            except ValueError as e:
                raise ValueError(f"layer {name}: {e}") from None
    writer.check_experts([n for n, m in model.named_modules() if isinstance(m, QuantExperts)])
    with atomic_output(out, overwrite=overwrite) as tmp:
        writer.write(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


__all__ = ["Layout", "register_layout", "get_layout", "layout_names", "detect_layout", "storing_layouts",
           "load_model", "save_quantized", "read_config_json", "as_qtune_config", "layout_claiming"]
