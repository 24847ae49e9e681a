"""Integrations: transformers (``QTuneConfig``, quant_method ``"qtune"``), checkpoint layouts (qtune's own,
bitsandbytes, GPTQ) in :mod:`.layouts`; peft and trl in their own modules.

Importing this package registers ``QTuneConfig`` with transformers.
"""
from ..nn import dequantize_model
from .layouts import load_model, save_quantized
from .transformers import QTuneConfig, QTuneHfQuantizer, mark_quantized

__all__ = ["QTuneConfig", "QTuneHfQuantizer", "mark_quantized", "load_model", "save_quantized", "dequantize_model"]
