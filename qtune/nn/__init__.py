"""Quantized layers, the layer plan and the model pass."""
from .base import (QuantLinear, float_weight_of, is_conv1d, layer_class_for, packed_storage_parameters, register_layer,
                   set_storage_dtype)
from .experts import QuantExperts, QuantExpertStack, fused_experts_modules, is_fused_experts
from .layers import Linear4bit, LinearAffine, LinearGGUF, LinearGPTQ, LinearInt8, LinearLLMInt8
from .replace import (DEFAULT_SKIP, LayerPlan, QuantizationReport, config_for, dequantize_model, linear_modules,
                      name_matches, plan_layers, quantize_experts, quantize_layer, quantize_model, set_submodule,
                      unquantizable_modules)

__all__ = ["QuantLinear", "Linear4bit", "LinearInt8", "LinearLLMInt8", "LinearGPTQ", "LinearGGUF", "LinearAffine", "quantize_model",
           "quantize_layer", "dequantize_model", "QuantizationReport", "LayerPlan", "plan_layers", "DEFAULT_SKIP",
           "unquantizable_modules", "set_submodule", "linear_modules", "name_matches", "config_for",
           "layer_class_for", "register_layer", "float_weight_of", "is_conv1d", "set_storage_dtype",
           "packed_storage_parameters", "quantize_experts", "QuantExperts", "QuantExpertStack", "fused_experts_modules", "is_fused_experts"]
