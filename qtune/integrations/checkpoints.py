"""Former home of the checkpoint readers and writers, now :mod:`qtune.integrations.layouts` (one module per
layout) and :func:`qtune.nn.dequantize_model`; these names stay importable from here for existing callers."""
from __future__ import annotations

from ..nn import dequantize_model
from .layouts import load_model, read_config_json, save_quantized
from .layouts.bnb import bnb_kind, bnb_tensors
from .layouts.gptq import gptq_tensors
from .safetensors_header import LazyTensor, safetensors_files

__all__ = ["load_model", "save_quantized", "dequantize_model", "bnb_tensors", "gptq_tensors", "bnb_kind",
           "safetensors_files", "read_config_json", "LazyTensor"]
