"""qtune's ``torch.library`` operators (importing this package registers them)."""
from . import cpu_native, dequantize, dispatch, linear  # noqa: F401  (registration side effect)
from .library import LIB, register_device_kernel

cpu_native.register()
from .linear import GRAD_INPUT_OPS, LINEAR_OPS, WEIGHT_SCHEMAS, dequantize as dequantize_weight, quant_linear

__all__ = ["LIB", "register_device_kernel", "dispatch", "LINEAR_OPS", "GRAD_INPUT_OPS", "WEIGHT_SCHEMAS",
           "dequantize_weight", "quant_linear"]
