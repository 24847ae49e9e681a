"""``QuantLinear``: the frozen quantized replacement of ``nn.Linear`` and GPT-2's ``Conv1D``.

Every format subclass keeps its packed tensors as buffers (``requires_grad=False``, moved by
``.to()`` but never re-quantized by it) and static metadata as plain attributes. For FSDP, which
shards parameters only, :meth:`QuantLinear.set_storage_dtype` turns the main packed tensor into a frozen
float ``Parameter`` viewing the same bytes (bitsandbytes' ``quant_storage``). The forward pass calls
the format's ``qtune::linear_*`` op, whose autograd rule sends gradients to the input (and the bias
when it requires grad) and re-dequantizes the weight in backward.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..formats.base import QuantConfig, dtype_name, parse_dtype
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

    A format's layer implements ``__init__`` (empty buffers of the right shapes and dtypes), :meth:`quantize_`
    and :meth:`weight_args`; :meth:`requantize_` may be overridden (GPTQ re-rounds onto its own grid).

    Attributes:
        op_family: the ``qtune::linear_<op_family>`` op family (the config's ``op_family``).
        packed_name: the main packed tensor (``weight``, GPTQ's ``qweight``), the one FSDP storage applies to.
        from_conv1d: the layer replaced a GPT-2 ``Conv1D`` (the export writes the weight back transposed).
    """

    packed_name: ClassVar[str] = "weight"

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig, *,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.config = config
        self.op_family = config.op_family
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
        layer.quantize_(weight, name=name or type(module).__name__, **kwargs)
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(layer.compute_dtype))
        layer.from_conv1d = is_conv1d(module)
        return layer

    def quantize_(self, weight: Tensor, *, name: str = "", **kwargs: Any) -> None:
        """Quantize a float weight [out_features, in_features] with ``self.config`` into this layer's buffers,
        in place (the buffers get the tensors the format's reference quantizer returns, on ``weight``'s device).

        Args:
            weight: float [out_features, in_features].
            name: the layer's name, for error messages.
            kwargs: format-specific extras (GPTQ: ``hessian``).
        Raises:
            ValueError: bad shape, NaN/Inf, or missing extras (the message names the layer).
        """
        raise NotImplementedError

    def load_quantized_(self, weight: Tensor, config: QuantConfig | None = None, *, name: str = "",
                        **kwargs: Any) -> None:
        """:meth:`quantize_` for callers that hold the config (it must be the layer's own)."""
        if config is not None and config != self.config:
            raise ValueError(f"{name or type(self).__name__}: config {config} is not the layer's {self.config}")
        self.quantize_(weight, name=name, **kwargs)

    def requantize_(self, weight: Tensor, *, name: str = "") -> int:
        """Replace the quantized weight by the quantization of ``weight`` [out_features, in_features], in place,
        keeping every buffer's dtype (e.g. fp16 scales). Formats that cannot re-run their quantizer here (GPTQ
        needs a Hessian) override it.

        Returns:
            The number of weights clamped to the grid (0 for formats that choose a new grid).
        Raises:
            ValueError: ``weight`` has the wrong shape or holds NaN/Inf.
        """
        self._check_dense_shape(weight, name)
        dtypes = {k: b.dtype for k, b in self.named_buffers(recurse=False)}
        self.quantize_(weight, name=name or type(self).__name__)
        for k, b in list(self.named_buffers(recurse=False)):
            if k in dtypes and b.dtype != dtypes[k]:
                setattr(self, k, b.to(dtypes[k]))
        return 0

    def _check_dense_shape(self, weight: Tensor, name: str) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{name or type(self).__name__}: new weight has shape {tuple(weight.shape)}, "
                             f"expected {(self.out_features, self.in_features)}")

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A float ``nn.Linear`` (or ``Conv1D``, for a layer that replaced one) holding the dequantized weight.

        Args:
            dtype: the new layer's dtype (default: ``compute_dtype``).
        """
        w = self.dequantize(dtype or self.compute_dtype)
        if self.from_conv1d:
            from transformers.pytorch_utils import Conv1D

            new = Conv1D(self.out_features, self.in_features)
            new.weight = nn.Parameter(w.t().contiguous())
        else:
            new = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                            dtype=w.dtype)
            new.weight = nn.Parameter(w)
        if self.bias is not None:
            new.bias = nn.Parameter(self.bias.detach().to(w.dtype))
        return new

    # -- storage (FSDP) -------------------------------------------------------------------------
    def packed(self) -> Tensor:
        """The main packed tensor in its integer dtype, whatever its storage."""
        t = getattr(self, self.packed_name)
        int_dtype = getattr(self, "_packed_int_dtype", None)
        if int_dtype is None:
            return t
        if t.dtype != self._packed_float_dtype:
            raise RuntimeError(f"{type(self).__name__}: the packed weight stored as {self._packed_float_dtype} was cast "
                               f"to {t.dtype} (e.g. by FSDP mixed precision): its bytes are lost; use the same "
                               "dtype for the storage as FSDP's parameter dtype")
        return t.view(int_dtype)

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype the main packed tensor is stored in (its integer dtype unless :meth:`set_storage_dtype` changed it)."""
        return getattr(self, self.packed_name).dtype

    def set_storage_dtype(self, dtype: torch.dtype | str | None) -> None:
        """Store the main packed tensor as a frozen float ``Parameter`` of ``dtype`` (``None``: back to a buffer).

        The bytes are reinterpreted, never converted: ``packed()`` views them back as integers, so results
        are unchanged. FSDP shards parameters only; with float storage it shards the quantized base too
        (use the same dtype as FSDP's parameter dtype so its mixed precision never casts it).

        Raises:
            ValueError: the packed row size (bytes) is not a multiple of the dtype's size.
        """
        name = self.packed_name
        current = self.packed()
        if dtype is None or not (dtype := parse_dtype(dtype, what="storage dtype")).is_floating_point:
            if getattr(self, "_packed_int_dtype", None) is not None:
                del self._parameters[name]
                self.register_buffer(name, current.detach())
                self._packed_int_dtype = None
            return
        row_bytes = current.shape[-1] * current.element_size()
        if row_bytes % dtype.itemsize:
            raise ValueError(f"{type(self).__name__}: packed tensor {name} {tuple(current.shape)} {current.dtype} has "
                             f"{row_bytes} bytes per row, not a multiple of {dtype} ({dtype.itemsize} bytes); "
                             "keep the integer storage for this layer")
        if name in self._buffers:
            del self._buffers[name]
        else:
            del self._parameters[name]
        self.register_parameter(name, nn.Parameter(current.detach().view(dtype), requires_grad=False))
        self._packed_int_dtype, self._packed_float_dtype = current.dtype, dtype

    def _apply(self, fn, recurse: bool = True):
        # `.to(dtype)`/`.half()` convert floating tensors: float-stored packed bytes must only move, never be
        # cast, so they pass through as their integer view (which those conversions leave alone)
        storage = getattr(self, "_packed_int_dtype", None)
        if storage is None:
            return super()._apply(fn, recurse)
        name = self.packed_name
        float_dtype = self._parameters[name].dtype
        self._parameters[name] = nn.Parameter(self._parameters[name].detach().view(storage), requires_grad=False)
        try:
            return super()._apply(fn, recurse)
        finally:
            self._parameters[name] = nn.Parameter(self._parameters[name].detach().view(float_dtype), requires_grad=False)

    # -- compute --------------------------------------------------------------------------------
    @property
    def op_format(self) -> str:
        """Former name of :attr:`op_family` (deprecated)."""
        import warnings

        warnings.warn("QuantLinear.op_format is deprecated; use op_family", DeprecationWarning, stacklevel=2)
        return self.op_family

    def weight_args(self) -> tuple:
        """The positional weight arguments of ``qtune::linear_<op_family>`` (its schema's order)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Dense weight [out_features, in_features] in ``dtype`` (default: ``compute_dtype``)."""
        return _dequantize(self.op_family, self.weight_args(), dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``y = x Ŵᵀ + b``.

        Outside autocast the matmul runs in ``compute_dtype`` and ``y`` is cast back to ``x.dtype``. Under
        ``torch.autocast(device_type, dtype)`` (for ``x``'s device type) the layer behaves as ``nn.Linear``
        does there: ``x`` and the bias are cast to the autocast dtype, the matmul runs in it, and ``y`` is
        returned in it (whatever ``compute_dtype`` and ``x.dtype`` are).

        Args:
            x: (..., in_features), any floating dtype.
        Returns:
            (..., out_features): ``x.dtype``, or the autocast dtype under autocast.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        device_type = x.device.type
        autocast = x.is_floating_point() and torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.compute_dtype
        bias = self.bias
        b = None if bias is None else bias.to(dtype)
        if not autocast:
            return quant_linear(self.op_family, x.to(dtype), self.weight_args(), b).to(x.dtype)
        # inside the op, autocast would recast the kernels' own fp32 arithmetic (e.g. exact int8 products)
        with torch.autocast(device_type, enabled=False):
            return quant_linear(self.op_family, x.to(dtype), self.weight_args(), b)

    # -- groups along in_features (quantization-aware LoRA, exact merges) --------------------------
    @property
    def quant_group_size(self) -> int | None:
        """Consecutive weights of a row (along ``in_features``) that share their quantization parameters (scale,
        and offset where the format has one), or ``None`` when the format has no such group (per-row scales, or
        groups that are not contiguous, e.g. GPTQ classic act-order). What quantization-aware LoRA pools its input over.

        Default: :attr:`offset_group_size` (a format with per-group float offsets groups along ``in_features``).
        """
        return self.offset_group_size

    @property
    def offset_group_size(self) -> int | None:
        """Group size along ``in_features`` of a per-group **float** offset (``W = scale·q + offset``), or ``None``.

        A layer with such offsets can take a change that is constant within each group exactly (up to the
        offset's storage rounding) through :meth:`add_to_offsets_`, codes and scales untouched: the exact merge
        of a quantization-aware LoRA adapter. ``None`` for formats without offsets (NF4, Q4_0, Q8_0), with integer
        zero points (GPTQ), or with quantized offsets (the K-quants' 6-bit mins).
        """
        return None

    def add_to_offsets_(self, delta: Tensor, *, name: str = "") -> None:
        """Add ``delta`` to each group's offset in place, rounded to the offset's storage dtype (codes and scales
        untouched): ``W[o, j] += delta[o, j // offset_group_size]``.

        Args:
            delta (Tensor): fp32 [out_features, in_features // offset_group_size].
            name: the layer's name, for error messages.
        Raises:
            TypeError: the format has no per-group float offset (:attr:`offset_group_size` is ``None``).
            ValueError: ``delta`` has the wrong shape or holds NaN/Inf.
        """
        raise TypeError(f"{name or type(self).__name__}: format {self.config.format} has no per-group float offset "
                        "to add a change to (offset_group_size is None); merge by re-quantizing instead")

    def _check_offset_delta(self, delta: Tensor, name: str) -> Tensor:
        """``delta`` as fp32 [out_features, in_features // offset_group_size], or a ValueError naming the layer."""
        g = self.offset_group_size
        expected = (self.out_features, self.in_features // g)
        if tuple(delta.shape) != expected:
            raise ValueError(f"{name or type(self).__name__}: offset change has shape {tuple(delta.shape)}, expected "
                             f"{expected} (one value per group of {g} weights)")
        if not delta.is_floating_point() or not bool(torch.isfinite(delta).all()):
            raise ValueError(f"{name or type(self).__name__}: offset change must be finite floats, got {delta.dtype}"
                             + ("" if not delta.is_floating_point() else " holding NaN/Inf"))
        return delta.detach().float()

    # -- reporting ------------------------------------------------------------------------------
    def quantized_bytes(self) -> int:
        """Bytes of the packed weight and its scales (buffers), excluding the bias."""
        tensors = list(self.buffers(recurse=False))
        if getattr(self, "_packed_int_dtype", None) is not None:
            tensors.append(getattr(self, self.packed_name))
        return sum(t.numel() * t.element_size() for t in tensors)

    def bits_per_parameter(self) -> float:
        return 8.0 * self.quantized_bytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.config.format}, bits={self.config.bits}, "
                f"compute_dtype={dtype_name(self.compute_dtype)}")


def set_storage_dtype(model: nn.Module, dtype: torch.dtype | str | None) -> int:
    """:meth:`QuantLinear.set_storage_dtype` on every qtune layer of ``model``; returns how many layers.

    Call it on the model FSDP will wrap (after adding adapters, before ``fully_shard``/``accelerate``
    prepares it); ``None`` restores integer buffers (e.g. before saving the base).
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.set_storage_dtype(dtype)
    return len(layers)


def packed_storage_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The packed tensors that :func:`set_storage_dtype` turned into (frozen) parameters."""
    return [getattr(m, m.packed_name) for m in model.modules()
            if isinstance(m, QuantLinear) and getattr(m, "_packed_int_dtype", None) is not None]
