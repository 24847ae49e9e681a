"""Quantized linear operators and their autograd rule.

Each op family ``F`` (one :class:`OpFamily` record: weight-argument schema, dequantize, shape, optional
reference linear; a format's config names its family in ``op_family``) declares two ops:

- ``qtune::linear_F(Tensor x, <weight args>, Tensor? bias) -> Tensor`` computes ``y = x Ŵᵀ + b`` with
  ``Ŵ`` the dequantized weight [N, K]; ``x`` is (..., K) and ``y`` (..., N), both in ``x.dtype``.
- ``qtune::linear_F_grad_input(Tensor grad_out, <weight args>) -> Tensor`` computes ``dx = dy Ŵ``.

A new family is added with :func:`register_op_family` (from any module: a test defines one).

Autograd (``y = x Ŵᵀ + b``)::

    dx = dy Ŵ            (re-dequantized from the packed tensors in backward, never stored)
    db = Σ_rows dy       (only when the bias requires grad)
    dŴ = none            (the quantized weight is frozen)

The context saves the *packed* tensors, so a layer's backward costs no memory beyond its quantized
weight. The reference kernels below dequantize then call a dense matmul; ``kernels/`` registers Triton
kernels for CUDA against the same ops (fused, or dequantize + cuBLAS by problem size: see
:mod:`qtune.ops.dispatch`). A CUDA tensor that reaches a reference kernel (Triton missing, registration
failed, CUDA not visible at import) triggers one warning per process naming the cause and the fix.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats.int8 import llm_int8_linear
from . import dequantize as dq
from .library import define, warn_slow_path


@dataclasses.dataclass(frozen=True)
class OpFamily:
    """One family of quantized linear ops: ``qtune::linear_<name>`` and ``qtune::linear_<name>_grad_input``.

    The weight arguments are named once, in ``schema``; ``dequantize``, ``shape`` and ``linear`` take them as
    keyword arguments of those names (checked at registration).

    Attributes:
        name: the family (``4bit``, ``int8``, ``llm_int8``, ``gptq``...): a config's ``op_family``.
        schema: the weight arguments in ``torch.library`` schema syntax, e.g. ``"Tensor weight, Tensor scale"``.
        dequantize: ``(**weight args, dtype) -> Tensor [N, K]``; call the ``qtune::dequantize_*`` ops here so
            device kernels apply.
        shape: ``(**weight args) -> (N, K)``, usable on fake tensors (``torch.compile``).
        linear: reference ``(x, **weight args, bias) -> y`` (default: ``F.linear`` on the dequantized weight).
        grad_input_of: reuse that family's ``grad_input`` op (same weight arguments) instead of defining one.
    """

    name: str
    schema: str
    dequantize: Callable[..., Tensor]
    shape: Callable[..., tuple[int, int]]
    linear: Callable[..., Tensor] | None = None
    grad_input_of: str | None = None

    @functools.cached_property
    def arg_names(self) -> tuple[str, ...]:
        """The weight arguments' names, in schema order."""
        return tuple(re.findall(r"(\w+)\s*(?:=[^,]*)?(?:,|$)", self.schema))

    def named(self, weight_args: tuple) -> dict:
        return dict(zip(self.arg_names, weight_args))


OP_FAMILIES: dict[str, OpFamily] = {}
LINEAR_OPS: dict[str, torch._ops.OpOverload] = {}
GRAD_INPUT_OPS: dict[str, torch._ops.OpOverload] = {}
WEIGHT_SCHEMAS: dict[str, str] = {}  # families with their own op pair (what device kernels implement)


def dequantize(family: str, weight_args: tuple, dtype: torch.dtype) -> Tensor:
    """Dense [N, K] weight of ``dtype`` from an op family's weight args."""
    fam = OP_FAMILIES[family]
    return fam.dequantize(**fam.named(weight_args), dtype=dtype)


def _reference_linear(fam: OpFamily) -> Callable:
    def linear(x: Tensor, *args) -> Tensor:
        warn_slow_path(x.device.type)
        *w, bias = args
        if fam.linear is not None:
            return fam.linear(x, **fam.named(tuple(w)), bias=bias)
        return F.linear(x, dequantize(fam.name, tuple(w), x.dtype), None if bias is None else bias.to(x.dtype))
    return linear


def _reference_grad_input(fam: OpFamily) -> Callable:
    def grad_input(grad_out: Tensor, *w) -> Tensor:
        warn_slow_path(grad_out.device.type)
        return torch.matmul(grad_out, dequantize(fam.name, tuple(w), grad_out.dtype))
    return grad_input


def _fake_linear(fam: OpFamily) -> Callable:
    def fake(x: Tensor, *args) -> Tensor:
        *w, bias = args
        n, k = fam.shape(**fam.named(tuple(w)))
        torch._check(x.shape[-1] == k, lambda: f"linear_{fam.name}: x has {x.shape[-1]} features, weight expects {k}")
        return x.new_empty((*x.shape[:-1], n))
    return fake


def _fake_grad_input(fam: OpFamily) -> Callable:
    def fake(grad_out: Tensor, *w) -> Tensor:
        n, k = fam.shape(**fam.named(tuple(w)))
        return grad_out.new_empty((*grad_out.shape[:-1], k))
    return fake


def _setup_context(ctx, inputs, output) -> None:
    x, *w, bias = inputs
    # keep the packed tensors (not a dense copy); plain args ride along on ctx
    ctx.tensor_slots = [isinstance(a, Tensor) for a in w]
    ctx.plain_args = [None if t else a for a, t in zip(w, ctx.tensor_slots)]
    ctx.save_for_backward(*[a for a in w if isinstance(a, Tensor)])
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(grad_op: Callable) -> Callable:
    def backward(ctx, grad_out: Tensor):
        saved = iter(ctx.saved_tensors)
        w = [next(saved) if t else a for a, t in zip(ctx.plain_args, ctx.tensor_slots)]
        grad_x = grad_op(grad_out, *w) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[-1]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return (grad_x, *([None] * len(w)), grad_b)
    return backward


def _check_arguments(fam: OpFamily, fn: Callable, what: str, extra: tuple[str, ...]) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    missing = [a for a in (*fam.arg_names, *extra) if a not in params]
    if missing:
        raise TypeError(f"register_op_family({fam.name!r}): {what} does not take the schema's argument(s) {missing}")


def register_op_family(family: OpFamily) -> OpFamily:
    """Define ``qtune::linear_<name>`` (and ``..._grad_input`` unless ``grad_input_of``) with their reference
    kernels, fake kernels and autograd rule. Device kernels override them with
    :func:`qtune.ops.register_device_kernel`.

    Raises:
        ValueError: the family is already registered.
        TypeError: ``dequantize``/``shape``/``linear`` do not take the schema's argument names.
    """
    if family.name in OP_FAMILIES:
        raise ValueError(f"op family {family.name!r} is already registered")
    _check_arguments(family, family.dequantize, "dequantize", ("dtype",))
    _check_arguments(family, family.shape, "shape", ())
    if family.linear is not None:
        _check_arguments(family, family.linear, "linear", ("bias",))
    OP_FAMILIES[family.name] = family
    name, schema = family.name, family.schema
    if family.grad_input_of is None:
        WEIGHT_SCHEMAS[name] = schema
        GRAD_INPUT_OPS[name] = define(f"linear_{name}_grad_input(Tensor grad_out, {schema}) -> Tensor",
                                      _reference_grad_input(family), _fake_grad_input(family))
    else:
        GRAD_INPUT_OPS[name] = GRAD_INPUT_OPS[family.grad_input_of]
    LINEAR_OPS[name] = define(f"linear_{name}(Tensor x, {schema}, Tensor? bias) -> Tensor",
                              _reference_linear(family), _fake_linear(family))
    torch.library.register_autograd(f"qtune::linear_{name}", _backward(GRAD_INPUT_OPS[name]),
                                    setup_context=_setup_context)
    return family


def _llm_int8_dequantize(weight: Tensor, scb: Tensor, threshold: float, dtype: torch.dtype) -> Tensor:
    return dq.dequantize_int8(weight, scb.view(-1, 1), None, -1, dtype)


def _llm_int8_shape(weight: Tensor, scb: Tensor, threshold: float) -> tuple[int, int]:
    return tuple(weight.shape)


def _llm_int8_linear(arithmetic: str) -> Callable[..., Tensor]:
    def linear(x: Tensor, weight: Tensor, scb: Tensor, threshold: float, bias: Tensor | None) -> Tensor:
        return llm_int8_linear(x, weight, scb, threshold, bias, mm_dequant=dq.int8_mm_dequant, arithmetic=arithmetic)
    return linear


_LLM_INT8_SCHEMA = "Tensor weight, Tensor scb, float threshold"

for _family in (
    OpFamily("4bit", "Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
                     "Tensor? nested_offset, int blocksize, int[] shape",
             dequantize=lambda packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape, dtype:
                 dq.dequantize_4bit(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape, dtype),
             shape=lambda shape, **_: (shape[0], shape[1])),
    OpFamily("int8", "Tensor weight, Tensor scale, Tensor? zero, int group_size",
             dequantize=lambda weight, scale, zero, group_size, dtype: dq.dequantize_int8(weight, scale, zero, group_size, dtype),
             shape=lambda weight, **_: tuple(weight.shape)),
    OpFamily("llm_int8", _LLM_INT8_SCHEMA, dequantize=_llm_int8_dequantize, shape=_llm_int8_shape,
             linear=_llm_int8_linear("qtune")),
    OpFamily("gptq", "Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int bits, int in_features",
             dequantize=lambda qweight, qzeros, scales, g_idx, bits, in_features, dtype:
                 dq.dequantize_gptq(qweight, qzeros, scales, g_idx, bits, in_features, dtype),
             shape=lambda scales, in_features, **_: (scales.shape[1], in_features)),
    # LLM.int8 with bitsandbytes' own arithmetic (fp16 cast of the activations, its epilogue constants): the
    # layers of checkpoints bitsandbytes wrote compute what bitsandbytes computes. Its spec is
    # ``llm_int8_linear(..., arithmetic="bitsandbytes")``; it runs as torch ops on every device (the int8 GEMM
    # is ``torch._int_mm`` on CUDA, as in bitsandbytes' default backend), so no Triton kernel overrides it.
    # Backward is LLM.int8's (``dx = dy · CB·SCB/127``), with its device kernels.
    OpFamily("llm_int8_bnb", _LLM_INT8_SCHEMA, dequantize=_llm_int8_dequantize, shape=_llm_int8_shape,
             linear=_llm_int8_linear("bitsandbytes"), grad_input_of="llm_int8"),
    # GGUF block types (qtune.formats.gguf): the file's blocks, uint8 [N, K/block·bytes], and the GGML type
    OpFamily("gguf", "Tensor weight, int ggml_type, int in_features",
             dequantize=lambda weight, ggml_type, in_features, dtype:
                 dq.dequantize_gguf(weight, ggml_type, in_features, dtype),
             shape=lambda weight, in_features, **_: (weight.shape[0], in_features)),
    # float-offset groups (qtune.formats.affine): packed codes uint8 [N, ceil(K/8)·bits], fp16 scale/offset [N, G]
    OpFamily("affine", "Tensor weight, Tensor scale, Tensor offset, int bits, int group_size, int in_features",
             dequantize=lambda weight, scale, offset, bits, group_size, in_features, dtype:
                 dq.dequantize_affine(weight, scale, offset, bits, group_size, in_features, dtype),
             shape=lambda weight, in_features, **_: (weight.shape[0], in_features)),
):
    register_op_family(_family)


def quant_linear(family: str, x: Tensor, weight_args: tuple, bias: Tensor | None) -> Tensor:
    """``y = x Ŵᵀ + b`` through ``qtune::linear_<family>`` (differentiable in ``x`` and ``bias``)."""
    return LINEAR_OPS[family](x, *weight_args, bias)
