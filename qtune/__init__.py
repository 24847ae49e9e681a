"""qtune: LoRA fine-tuning on qtune's own quantized, frozen base layers.

>>> import qtune
>>> report = qtune.quantize_model(model, qtune.NF4Config(double_quant=True))
"""
from . import ops  # noqa: F401  (registers the qtune:: operators)
from .formats import (CONFIGS, FP4Config, GPTQConfig, Int8Config, LLMInt8Config, NF4Config, QuantConfig, RTNConfig,
                      config_from_dict)
from .nn import (Linear4bit, LinearGPTQ, LinearInt8, LinearLLMInt8, QuantizationReport, QuantLinear,
                 quantize_model)

__version__ = "0.1.0"


def _register_device_kernels() -> None:
    # Triton kernels for CUDA tensors; a machine without triton keeps the reference kernels.
    try:
        from . import kernels
    except ImportError:
        return
    kernels.register()


_register_device_kernels()

__all__ = ["NF4Config", "FP4Config", "Int8Config", "LLMInt8Config", "GPTQConfig", "RTNConfig", "QuantConfig",
           "CONFIGS", "config_from_dict", "QuantLinear", "Linear4bit", "LinearInt8", "LinearLLMInt8", "LinearGPTQ",
           "quantize_model", "QuantizationReport", "__version__"]
