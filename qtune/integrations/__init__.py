"""Integrations: transformers (``QTuneConfig``, quant_method ``"qtune"``), existing checkpoints (bitsandbytes,
GPTQ) in :mod:`.checkpoints`; peft and trl in their own modules.

Importing this package registers ``QTuneConfig`` with transformers.
"""
from .checkpoints import dequantize_model, load_model, save_quantized
from .transformers import QTuneConfig, QTuneHfQuantizer, mark_quantized

__all__ = ["QTuneConfig", "QTuneHfQuantizer", "mark_quantized", "load_model", "save_quantized", "dequantize_model"]
