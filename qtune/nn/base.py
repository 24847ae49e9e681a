"""``QuantLinear``: the frozen quantized replacement of ``nn.Linear`` and GPT-2's ``Conv1D``.

Every format subclass keeps its packed tensors as buffers (``requires_grad=False``, moved by
``.to()`` but never re-quantized by it) and static metadata as plain attributes. The forward pass calls
the format's ``qtune::linear_*`` op, whose autograd rule sends gradients to the input (and the bias
when it requires grad) and re-dequantizes the weight in backward.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..formats.base import QuantConfig, dtype_name
from ..ops.linear import dequantize as _dequantize
from ..ops.linear import quant_linear

_LAYERS: dict[type[QuantConfig], type["QuantLinear"]] = {}


def register_layer(*config_types: type[QuantConfig]):
    """Class decorator: ``QuantLinear`` subclass used for these config types."""
    def deco(cls):
        for ct in config_types:
            _LAYERS[ct] = cls
        return cls
    return deco


def layer_class_for(config: QuantConfig) -> type["QuantLinear"]:
    try:
        return _LAYERS[type(config)]
    except KeyError:
        raise TypeError(f"no QuantLinear layer is registered for {type(config).__name__}") from None


def float_weight_of(module: nn.Module, name: str = "") -> tuple[Tensor, Tensor | None]:
    """The [out_features, in_features] weight and bias of an ``nn.Linear`` or transformers ``Conv1D``.

    ``Conv1D`` stores its weight as [in_features, out_features]; it is transposed here.

    Raises:
        TypeError: the module is neither.
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias
    if is_conv1d(module):
        return module.weight.detach().t(), module.bias
    raise TypeError(f"{name or type(module).__name__}: expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the core works without it
        return False
    return isinstance(module, Conv1D)


class QuantLinear(nn.Module):
    """Base of the quantized linear layers: ``y = x Ŵᵀ + b`` with a frozen, packed ``Ŵ``.

    Args:
        in_features, out_features: the dense weight is [out_features, in_features].
        bias: whether the layer has a bias (kept in ``compute_dtype``, frozen until a trainer unfreezes it).
        config: the format config.
        compute_dtype: dtype of the matmul (fp32/fp16/bf16). Inputs are cast to it and outputs cast back.

    Attributes:
        op_format: key of the ``qtune::linear_<op_format>`` op.
        from_conv1d: the layer replaced a GPT-2 ``Conv1D`` (the export writes the weight back transposed).
    """

    op_format: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig, *,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.config = config
        self.compute_dtype = config.torch_compute_dtype or compute_dtype
        self.from_conv1d = False
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig, *, name: str = "", **kwargs: Any) -> "QuantLinear":
        """Quantize an ``nn.Linear`` or ``Conv1D`` into a new layer (the input module is left untouched).

        Args:
            module: the float layer.
            config: the format config.
            name: the layer's dotted name, used in error messages.
            kwargs: format-specific extras (GPTQ: ``hessian``).
        """
        weight, bias = float_weight_of(module, name)
        compute_dtype = config.torch_compute_dtype or weight.dtype
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, config, compute_dtype=compute_dtype,
                    device=weight.device)
        layer._load_quantized(weight, config, name=name or type(module).__name__, **kwargs)
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(layer.compute_dtype))
        layer.from_conv1d = is_conv1d(module)
        return layer

    def _load_quantized(self, weight: Tensor, config: QuantConfig, *, name: str, **kwargs: Any) -> None:
        raise NotImplementedError

    # -- compute --------------------------------------------------------------------------------
    def weight_args(self) -> tuple:
        """The positional weight arguments of ``qtune::linear_<op_format>``."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Dense weight [out_features, in_features] in ``dtype`` (default: ``compute_dtype``)."""
        return _dequantize(self.op_format, self.weight_args(), dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        bias = self.bias
        y = quant_linear(self.op_format, x.to(self.compute_dtype), self.weight_args(),
                         None if bias is None else bias.to(self.compute_dtype))
        return y.to(x.dtype)

    # -- reporting ------------------------------------------------------------------------------
    def quantized_bytes(self) -> int:
        """Bytes of the packed weight and its scales (buffers), excluding the bias."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def bits_per_parameter(self) -> float:
        return 8.0 * self.quantized_bytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.config.format}, bits={getattr(self.config, 'bits', '?')}, "
                f"compute_dtype={dtype_name(self.compute_dtype)}")
