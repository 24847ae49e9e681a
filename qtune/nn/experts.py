"""Quantized fused mixture-of-experts stacks (transformers 5 experts modules).

Since transformers 5 a mixture-of-experts block keeps its experts as one module with fused 3-D parameters,
decorated by ``transformers.integrations.moe.use_experts_implementation``::

    gate_up_proj  [E, 2·I, H]   (``up_proj`` [E, I, H] when the experts have no gate)
    down_proj     [E, H, I]
    gate_up_proj_bias [E, 2·I], down_proj_bias [E, H]   (``has_bias``)

(``is_transposed``: ``[E, H, 2·I]`` and ``[E, I, H]``, used as ``x @ W[e]``). The decorator sets the flags
``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated``, ``has_post_expert_norm`` and the gating
``_apply_gate`` (gate/up concatenated or interleaved, family-specific clamps); the sparse MoE block around it
routes (``router`` → ``top_k_index``, ``top_k_weights``) and calls ``experts(hidden_states, top_k_index,
top_k_weights)``.

:class:`QuantExperts` replaces such a module. Each expert's weight, taken in the ``[out_features,
in_features]`` orientation of a linear layer (transposed layouts are transposed first), is quantized on its
own with the format's reference quantizer, exactly as a ``QuantLinear`` of that shape would be; the tensors
of the E experts are stacked along a leading dimension (:class:`QuantExpertStack`: buffers named as the
format's layer names them, e.g. NF4 ``weight [E, N, K/2]``, ``absmax [E, n_blocks]``). The router, the
biases, the activation, ``_apply_gate`` and the post-expert norm stay the model's own.

Forward (the contract of every ``experts_implementation``, computed as transformers' eager loop does)::

    for each expert e that received tokens (ascending), with (t, j) the (token, top-k slot) pairs routed to e:
        h = x[t] Ŵ_up[e]ᵀ (+ b_up[e])           qtune::linear_<family> on expert e's packed tensors
        h = _apply_gate(h)   (act_fn(h) without a gate)
        h = h Ŵ_down[e]ᵀ (+ b_down[e])          (post_expert_norm(h) when the family has one)
        s[t, j] = top_k_weights[t, j] · h
    y[t] = Σ_j s[t, j]

The slots are sorted by expert once (one ``argsort``, one gather of ``x``); each expert reads a contiguous
slice, and the weighted outputs are written to their slots and summed over the top-k (no ``index_add_``, which
is slow on CPU).

GPTQ stacks are quantized expert by expert with each expert's own Hessians (``QuantExpertStack.quantize_(...,
hessians=[...])``, built from the model's routing by :func:`qtune.calibration.gptq_quantize_model`); an expert
without one is quantized round-to-nearest on the same grid.

Only the experts that received tokens are dequantized, one at a time, inside their op (never a dense
``[E, 2·I, H]`` copy). Backward is the ops' autograd rule per expert (``dx = dy Ŵ_e``, re-dequantized from
the packed tensors), plus ordinary autograd for gating, routing weights (the router's gradient) and biases.

The same loop runs on every device: on CUDA each expert's ``qtune::linear_<family>`` call goes to the Triton
kernels by the dispatch policy (fused for small M, dequantize + cuBLAS above). A grouped path (all experts in one
launch, as ``grouped_mm``) is not implemented.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..formats.base import QuantConfig
from ..ops.linear import dequantize as _dequantize
from .base import QuantLinear, layer_class_for

#: the flags ``use_experts_implementation`` sets on an experts module
EXPERTS_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers fused experts module (``use_experts_implementation``) that
    :class:`QuantExperts` can replace: its flags are set and its weights are 3-D parameters."""
    if isinstance(module, QuantExperts) or not all(hasattr(module, f) for f in EXPERTS_FLAGS):
        return False
    names = _weight_names(module)
    return all(isinstance(module._parameters.get(n), nn.Parameter) and module._parameters[n].dim() == 3
               for n in names)


def fused_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every float fused experts module of ``model`` (see :func:`is_fused_experts`)."""
    return [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]


def _weight_names(module: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")


class QuantExpertStack(nn.Module):
    """E quantized weights of one shape ``[out_features, in_features]``, stacked along a leading dimension.

    The buffers are those of the format's ``QuantLinear`` layer (same names and dtypes) with an extra leading
    dimension of size ``num_experts``; expert ``e``'s tensors are the ``[e]`` slices, bit for bit what that
    layer's ``quantize_`` makes of expert ``e``'s weight.

    Args:
        num_experts, in_features, out_features: expert ``e``'s dense weight is [out_features, in_features].
        config: the format config.
        transposed: the model stores the weights as ``[E, in_features, out_features]`` (``is_transposed``).
        compute_dtype: dtype of the matmuls (the config's ``compute_dtype`` wins).
        device: where the (empty) buffers are allocated (``"meta"`` for loading).
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, config: QuantConfig, *,
                 transposed: bool = False, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts = int(num_experts)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.config = config
        self.transposed = bool(transposed)
        self.layer_class = layer_class_for(config)
        # a layer whose buffers are swapped for one expert's slices at each use (never registered: it holds views)
        view = self.layer_class(in_features, out_features, False, config, compute_dtype=compute_dtype, device="meta")
        self.compute_dtype = view.compute_dtype
        object.__setattr__(self, "_view", view)
        self._buffer_names = tuple(n for n, _ in view.named_buffers(recurse=False))
        for n in self._buffer_names:
            b = view._buffers[n]
            self.register_buffer(n, None if b is None else torch.zeros((self.num_experts, *b.shape), dtype=b.dtype,
                                                                         device=device))

    @classmethod
    def from_float(cls, weight: Tensor, config: QuantConfig, *, transposed: bool = False,
                   name: str = "") -> "QuantExpertStack":
        """Quantize a fused 3-D weight, expert by expert.

        Args:
            weight: [E, out, in] (``transposed``: [E, in, out]), float.
            config: the format config.
            transposed: the layout of ``weight``.
            name: the parameter's dotted name, for error messages.
        """
        if weight.dim() != 3:
            raise ValueError(f"{name or 'experts weight'}: expected a 3-D [experts, out, in] tensor, got "
                             f"{tuple(weight.shape)}")
        e, a, b = weight.shape
        out_f, in_f = (b, a) if transposed else (a, b)
        compute_dtype = config.torch_compute_dtype or weight.dtype
        stack = cls(e, in_f, out_f, config, transposed=transposed, compute_dtype=compute_dtype, device=weight.device)
        stack.quantize_(weight, name=name)
        return stack

    def quantize_(self, weight: Tensor, *, name: str = "", hessians: list | None = None) -> None:
        """Quantize ``weight`` (the model's 3-D layout) into the stacked buffers, one expert at a time.

        Args:
            weight: [E, out, in] (``transposed``: [E, in, out]), float.
            name: the parameter's dotted name, for error messages.
            hessians: formats that need calibration (GPTQ) only: one entry per expert, the Hessian of the
                inputs routed to it (``qtune.formats.gptq.GPTQHessian`` or a [in, in] tensor), or ``None`` for an
                expert quantized round-to-nearest on the same grid (``config.without_calibration()``: too few
                routed tokens, see :func:`qtune.calibration.gptq_quantize_model`).
        Raises:
            ValueError: wrong shape; NaN/Inf (the format's message, naming ``<name>[<expert>]``); a format whose
                tensors differ in shape or dtype between experts; a format that needs calibration without
                ``hessians`` (or with a list of the wrong length).
        """
        name = name or type(self).__name__
        expected = (self.num_experts, *self.param_shape)
        if tuple(weight.shape) != expected:
            raise ValueError(f"{name}: expert weights have shape {tuple(weight.shape)}, expected {expected}")
        if self.config.needs_calibration and hessians is None:
            raise ValueError(f"{name}: format {self.config.format!r} needs calibration: quantize the model with "
                             "qtune.calibration.gptq_quantize_model (per-expert Hessians from the router's routing), "
                             "or use a format without calibration (e.g. rtn, nf4, int8)")
        if hessians is not None and (not self.config.needs_calibration or len(hessians) != self.num_experts):
            raise ValueError(f"{name}: hessians are for formats that need calibration, one per expert; got "
                             f"{len(hessians)} for {self.num_experts} experts in format {self.config.format!r}")
        for e in range(self.num_experts):
            w = weight[e].detach()
            self.quantize_expert_(e, w.t() if self.transposed else w, name=f"{name}[{e}]",
                                  **({"hessian": hessians[e]} if hessians is not None else {}))

    def quantize_expert_(self, e: int, weight: Tensor, *, name: str = "", **calibration: Any) -> None:
        """Quantize expert ``e``'s dense ``weight`` [out_features, in_features] (a linear layer's orientation,
        whatever the model's layout) into its slices of the stacked buffers (LoRA merges use it).

        Args:
            calibration: ``hessian=`` for a format that needs calibration (GPTQ); ``hessian=None`` quantizes the
                expert round-to-nearest on the same grid (``config.without_calibration()``).
        """
        name = name or f"{type(self).__name__}[{e}]"
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{name}: expert weight has shape {tuple(weight.shape)}, expected "
                             f"{(self.out_features, self.in_features)}")
        w = weight.detach()
        config = self.config
        if config.needs_calibration and calibration.get("hessian", None) is None:
            fallback = getattr(config, "without_calibration", None)
            if fallback is None:
                raise ValueError(f"{name}: format {config.format!r} needs calibration and has no round-to-nearest "
                                 "fallback for an expert without calibration inputs")
            config, calibration = fallback(), {}
            if layer_class_for(config) is not self.layer_class:
                raise ValueError(f"{name}: the fallback {config.format!r} of {self.config.format!r} is stored by "
                                 f"{layer_class_for(config).__name__}, not {self.layer_class.__name__}")
        layer = self.layer_class(self.in_features, self.out_features, False, config,
                                 compute_dtype=self.compute_dtype, device=w.device)
        layer.quantize_(w, name=name, **calibration)
        for n in self._buffer_names:
            src, dst = layer._buffers[n], self._buffers[n]
            if (src is None) != (dst is None) or (src is not None and (src.shape != dst.shape[1:]
                                                                       or src.dtype != dst.dtype)):
                raise ValueError(f"{name}: the {self.config.format} tensor {n!r} is "
                                 f"{None if src is None else (tuple(src.shape), src.dtype)}, expected "
                                 f"{None if dst is None else (tuple(dst.shape[1:]), dst.dtype)} as for the "
                                 "other experts")
            if src is not None:
                if dst.device != src.device:
                    self._buffers[n] = dst = dst.to(src.device)
                dst[e].copy_(src)

    def _apply(self, fn, recurse: bool = True):
        # the view still holds slices of the old buffers: drop them, or `.to()` would keep the old copy alive
        for n in self._buffer_names:
            self._view._buffers[n] = None
        return super()._apply(fn, recurse)

    @property
    def param_shape(self) -> tuple[int, int]:
        """One expert's shape in the model's layout."""
        return (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)

    def expert(self, e: int) -> QuantLinear:
        """A ``QuantLinear`` viewing expert ``e``'s slices of the stacked buffers (valid until the next call).

        Calling it is ``y = x Ŵ_eᵀ`` with every ``QuantLinear`` rule (compute dtype, autocast, autograd).
        """
        view = self._view
        for n in self._buffer_names:
            b = self._buffers[n]
            view._buffers[n] = None if b is None else b[e]
        return view

    def dequantize(self, e: int, dtype: torch.dtype | None = None) -> Tensor:
        """Expert ``e``'s dense weight [out_features, in_features] in ``dtype`` (default ``compute_dtype``)."""
        view = self.expert(e)
        return _dequantize(view.op_family, view.weight_args(), dtype or self.compute_dtype)

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """All experts dense, in the model's layout ([E, out, in], or [E, in, out] transposed): for export and
        :meth:`QuantExperts.to_float` only (this is the dense copy the forward never makes)."""
        ws = [self.dequantize(e, dtype) for e in range(self.num_experts)]
        return torch.stack([w.t() if self.transposed else w for w in ws])

    def quantized_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"transposed={self.transposed}, format={self.config.format}, bits={self.config.bits}")


class QuantExperts(nn.Module):
    """The quantized replacement of a transformers fused experts module (see the module docstring).

    It keeps the float module's attributes (``config``, ``act_fn``, the ``use_experts_implementation`` flags,
    family constants such as gpt-oss' ``alpha``/``limit``), its submodules other than the weights (activation,
    ``post_expert_norm``) and its bias parameters, and calls the float class's own ``_apply_gate``. The weights
    become :class:`QuantExpertStack` children under the same names (``gate_up_proj``/``up_proj``,
    ``down_proj``).

    Attributes:
        quant_config: the qtune format config of the expert weights.
        float_class: the replaced module's class (its ``_apply_gate``; :meth:`to_float` builds one).
    """

    def __init__(self, experts: nn.Module, config: QuantConfig, *, device: torch.device | str | None = None,
                 name: str = "") -> None:
        """An empty (zero-buffer) replacement of ``experts``, which may live on the meta device; use
        :meth:`from_float` to quantize a float module."""
        super().__init__()
        name = name or type(experts).__name__
        if not is_fused_experts(experts):
            raise TypeError(f"{name}: {type(experts).__name__} is not a transformers fused experts module "
                            "(use_experts_implementation with 3-D gate_up_proj/up_proj and down_proj parameters)")
        self.float_class = type(experts)
        self.quant_config = config
        weight_names = _weight_names(experts)
        for k, v in vars(experts).items():
            if not k.startswith("_") or k == "_is_expert_parallel":
                if k != "training":
                    setattr(self, k, v)
        self.training = experts.training
        for n, m in experts.named_children():
            self.add_module(n, m)
        for n, p in experts._parameters.items():
            if n in weight_names:
                continue
            if p is not None and p.dim() > 2:
                raise TypeError(f"{name}.{n}: a {p.dim()}-D parameter of {type(experts).__name__} that qtune does "
                                "not know how to quantize")
            self.register_parameter(n, p)
        for n, b in experts._buffers.items():
            self.register_buffer(n, b, persistent=n not in experts._non_persistent_buffers_set)
        transposed = bool(experts.is_transposed)
        for n in weight_names:
            p = experts._parameters[n]
            e, a, b = p.shape
            out_f, in_f = (b, a) if transposed else (a, b)
            compute_dtype = config.torch_compute_dtype or (p.dtype if p.is_floating_point() else torch.float32)
            self.add_module(n, QuantExpertStack(e, in_f, out_f, config, transposed=transposed,
                                                compute_dtype=compute_dtype, device=p.device if device is None else device))
        self.weight_names = weight_names
        self.num_experts = self._modules[weight_names[1]].num_experts

    @classmethod
    def from_float(cls, experts: nn.Module, config: QuantConfig, *, name: str = "",
                   hessians: dict[str, list] | None = None) -> "QuantExperts":
        """Quantize a float fused experts module into a new :class:`QuantExperts` (``experts`` is left untouched).

        Args:
            hessians: formats that need calibration (GPTQ): ``{weight name: [one Hessian or None per expert]}``
                (see :meth:`QuantExpertStack.quantize_`; :func:`qtune.calibration.gptq_quantize_model` builds
                them from the tokens the model's router sends to each expert).
        Raises:
            TypeError: not a fused experts module, or it has other 3-D parameters.
            ValueError: the format needs calibration (GPTQ) and no ``hessians`` are given; non-finite weights
                (naming ``<name>.<param>[e]``).
        """
        name = name or type(experts).__name__
        if config.needs_calibration and hessians is None:
            raise ValueError(f"{name}: format {config.format!r} needs calibration: quantize the model with "
                             "qtune.calibration.gptq_quantize_model (per-expert Hessians from the router's routing), "
                             "use a format without calibration (e.g. rtn, nf4, int8), or skip the experts "
                             "(skip_modules=['experts'])")
        new = cls(experts, config, name=name)
        for n in new.weight_names:
            new._modules[n].quantize_(experts._parameters[n], name=f"{name}.{n}",
                                      hessians=None if hessians is None else hessians[n])
        return new

    def _apply_gate(self, gate_up: Tensor) -> Tensor:
        return self.float_class._apply_gate(self, gate_up)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *,
                lora: dict[str, list[tuple[Tensor, Tensor, float]]] | None = None) -> Tensor:
        """Mixture of the routed experts.

        Args:
            hidden_states: (tokens, hidden), float.
            top_k_index: (tokens, top_k) int expert ids; ids ``>= num_experts`` (expert-parallel sentinels) are
                skipped.
            top_k_weights: (tokens, top_k) routing weights (differentiable: the router's gradient).
            lora: low-rank deltas per weight name (``gate_up_proj``/``up_proj``, ``down_proj``): a list of
                ``(A [E, r, in], B [E, out, r], s)``; expert ``e``'s linear becomes ``x Ŵ_eᵀ + s·(x A_eᵀ) B_eᵀ``
                on the tokens routed to it, computed in A's dtype (the LoRA layer of ``qtune.integrations.peft``).
        Returns:
            (tokens, hidden) in ``hidden_states.dtype``.
        """
        up_name, down_name = self.weight_names
        up, down = self._modules[up_name], self._modules[down_name]
        lora = lora or {}

        def linear(name: str, stack: QuantExpertStack, e: int, x: Tensor) -> Tensor:
            y = stack.expert(e)(x)
            for a, b, s in lora.get(name, ()):
                xa = x.to(a.dtype)
                y = y + ((xa @ a[e].t()) @ b[e].t() * s).to(y.dtype)
            return y

        tokens, top_k = top_k_index.shape
        with torch.no_grad():  # the routing, sorted by expert once: slot (t, j) is row t·k + j of the flat order
            ids = top_k_index.reshape(-1)
            ids = torch.where((ids >= 0) & (ids < self.num_experts), ids, self.num_experts)  # sentinels sort last
            order = torch.argsort(ids, stable=True)
            counts = torch.bincount(ids, minlength=self.num_experts + 1)[:self.num_experts].tolist()
            routed = order[:sum(counts)]  # the routed slots, grouped by expert (ascending), tokens ascending
        up_bias = getattr(self, up_name + "_bias", None) if self.has_bias else None
        down_bias = getattr(self, down_name + "_bias", None) if self.has_bias else None
        x = hidden_states[routed // top_k]  # [routed slots, H], one gather (its backward: one accumulate)
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:  # an expert without tokens is never touched (nor dequantized)
                continue
            h = linear(up_name, up, e, x[start:start + n])
            start += n
            if up_bias is not None:
                h = h + up_bias[e]
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            h = linear(down_name, down, e, h)
            if down_bias is not None:
                h = h + down_bias[e]
            if self.has_post_expert_norm:
                h = self.post_expert_norm(h)
            outs.append(h)
        if not outs:
            return torch.zeros_like(hidden_states)
        h = torch.cat(outs) * top_k_weights.reshape(-1)[routed, None]
        # each slot written once (no accumulation, no atomics), then the top-k slots of a token summed
        slots = h.new_zeros(tokens * top_k, h.shape[-1]).index_copy(0, routed, h)
        return slots.view(tokens, top_k, -1).sum(1).to(hidden_states.dtype)

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A float module of the original class holding the dequantized weights (and this module's biases,
        activation, norm)."""
        new = self.float_class(self.config)
        for n in self.weight_names:
            stack = self._modules[n]
            w = stack.dense(dtype or stack.compute_dtype)
            setattr(new, n, nn.Parameter(w, requires_grad=False))
        for n, p in self._parameters.items():
            if p is not None:
                setattr(new, n, nn.Parameter(p.detach().to(dtype or p.dtype), requires_grad=p.requires_grad))
        for n, m in self._modules.items():
            if n not in self.weight_names:
                new.add_module(n, m)
        new._is_expert_parallel = getattr(self, "_is_expert_parallel", False)
        return new

    def float_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{parameter name: shape}`` of the replaced float weights (model layout)."""
        return {n: (self._modules[n].num_experts, *self._modules[n].param_shape) for n in self.weight_names}

    def quantized_bytes(self) -> int:
        """Bytes of the stacked quantized tensors (biases excluded)."""
        return sum(self._modules[n].quantized_bytes() for n in self.weight_names)

    def num_weights(self) -> int:
        return sum(s[0] * s[1] * s[2] for s in self.float_shapes().values())

    def bits_per_parameter(self) -> float:
        return 8.0 * self.quantized_bytes() / self.num_weights()

    def extra_repr(self) -> str:
        return (f"float_class={self.float_class.__name__}, num_experts={self.num_experts}, "
                f"format={self.quant_config.format}")
