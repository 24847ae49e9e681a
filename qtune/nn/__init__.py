"""Quantized layers and the model pass."""
from .base import (QuantLinear, float_weight_of, is_conv1d, layer_class_for, packed_storage_parameters, register_layer,
                   set_storage_dtype)
from .layers import Linear4bit, LinearGPTQ, LinearInt8, LinearLLMInt8
from .replace import QuantizationReport, config_for, linear_modules, name_matches, quantize_model

__all__ = ["QuantLinear", "Linear4bit", "LinearInt8", "LinearLLMInt8", "LinearGPTQ", "quantize_model",
           "QuantizationReport", "linear_modules", "name_matches", "config_for", "layer_class_for",
           "register_layer", "float_weight_of", "is_conv1d", "set_storage_dtype", "packed_storage_parameters"]
