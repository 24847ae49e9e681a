"""qtune: LoRA fine-tuning on qtune's own quantized, frozen base layers.

>>> import qtune
>>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qtune.QTuneConfig("nf4", double_quant=True))
>>> model = qtune.prepare_model_for_kbit_training(model)
>>> model = qtune.get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))

Importing qtune registers ``QTuneConfig`` (``quant_method: "qtune"``) with transformers, so a saved qtune
folder also loads through plain ``AutoModelForCausalLM.from_pretrained``. The peft, trl, training and
export helpers load on first use (they import peft and trl).
"""
from . import ops  # noqa: F401  (registers the qtune:: operators)
from .formats import (CONFIGS, FP4Config, GPTQConfig, Int8Config, LLMInt8Config, NF4Config, QuantConfig, RTNConfig,
                      config_from_dict)
from .nn import (Linear4bit, LinearGPTQ, LinearInt8, LinearLLMInt8, QuantizationReport, QuantLinear,
                 quantize_model, set_storage_dtype)

__version__ = "0.1.0"


def _register_device_kernels() -> None:
    """Register the Triton kernels for CUDA tensors; never let a failure escape ``import qtune``.

    Without Triton or CUDA nothing is registered (no warning: CPU use is normal). Any exception while
    importing or registering the kernels (e.g. a Triton too old for them: no ``tl.gather``) is reported
    in one warning naming its cause, and the reference kernels stay in use; a CUDA tensor that then
    reaches them warns again, once, with the fix (``qtune.ops.library.slow_path_reason``).
    """
    import warnings

    from .ops.library import note_registration_failure

    try:
        from . import kernels

        kernels.register()
    except Exception as e:  # noqa: BLE001  (any failure here must leave `import qtune` working)
        cause = f"{type(e).__name__}: {e}".splitlines()[0]
        note_registration_failure(cause)
        warnings.warn(f"qtune: registering the Triton kernels failed ({cause}); qtune's quantized layers use the "
                      "pure-PyTorch reference kernels (correct, much slower on GPUs)", RuntimeWarning, stacklevel=2)


_register_device_kernels()

from .integrations import QTuneConfig, dequantize_model, load_model, save_quantized  # noqa: E402  (registers with transformers)

# name -> module: imported on first access (peft and trl are heavy imports)
_LAZY = {
    "get_peft_model": "qtune.integrations.peft", "load_adapter": "qtune.integrations.peft",
    "merge_and_unload": "qtune.integrations.peft", "merge_report": "qtune.integrations.peft",
    "loftq_init_": "qtune.integrations.loftq",
    "quantization_aware_config": "qtune.integrations.peft",
    "prepare_model_for_kbit_training": "qtune.integrations.trl", "QTuneSFTTrainer": "qtune.integrations.trl",
    "gptq_quantize_model": "qtune.calibration", "quantize_with_calibration": "qtune.calibration",
    "calibration_windows": "qtune.calibration", "perplexity": "qtune.evaluate",
    "load_recipe": "qtune.train", "export": "qtune.export", "export_adapter": "qtune.export",
    "export_merged": "qtune.export", "export_quantized": "qtune.export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = ["NF4Config", "FP4Config", "Int8Config", "LLMInt8Config", "GPTQConfig", "RTNConfig", "QuantConfig",
           "CONFIGS", "config_from_dict", "QuantLinear", "Linear4bit", "LinearInt8", "LinearLLMInt8", "LinearGPTQ",
           "quantize_model", "QuantizationReport", "set_storage_dtype", "QTuneConfig", "load_model", "save_quantized", "dequantize_model",
           *_LAZY, "__version__"]
