"""qtune's ``torch.library`` operators (importing this package registers them)."""
from . import cpu_native, dequantize, dispatch, linear  # noqa: F401  (registration side effect)
from .library import LIB, register_device_kernel

cpu_native.register()
from .linear import (GRAD_INPUT_OPS, LINEAR_OPS, OP_FAMILIES, WEIGHT_SCHEMAS, OpFamily,  # noqa: E402
                     dequantize as dequantize_weight, quant_linear, register_op_family)

__all__ = ["LIB", "register_device_kernel", "dispatch", "LINEAR_OPS", "GRAD_INPUT_OPS", "WEIGHT_SCHEMAS",
           "OP_FAMILIES", "OpFamily", "register_op_family", "dequantize_weight", "quant_linear"]
