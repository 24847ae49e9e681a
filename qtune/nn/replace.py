"""The module-swapping pass and the layer plan.

The *layer plan* (:class:`LayerPlan`, built by :func:`plan_layers`) says which linear layers of a model get
which config and why the others stay float; quantize-on-load, calibration, inspection and
:func:`quantize_model` all build it here. (``qtune plan`` / :mod:`qtune.plan` is the *memory* plan.)
"""
from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping as MappingABC
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..formats.base import QuantConfig
from .base import QuantLinear, float_weight_of, is_conv1d, layer_class_for
from .experts import QuantExperts, fused_experts_modules

#: module name patterns kept in full precision unless the caller names its own
DEFAULT_SKIP = ("lm_head",)


def name_matches(name: str, pattern: str) -> bool:
    """``pattern`` matches a dotted module name as a whole, as its last components, or as a glob.

    ``"down_proj"`` matches ``model.layers.0.mlp.down_proj``; ``"*.mlp.*"`` is a glob over the full name.
    """
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


@dataclasses.dataclass
class LayerReport:
    name: str
    format: str
    bits_per_param: float
    bytes_before: int
    bytes_after: int


@dataclasses.dataclass
class QuantizationReport:
    """Bytes before/after for each replaced layer, and totals over the replaced layers.

    ``expert_fallbacks``: experts that GPTQ quantized round-to-nearest because the router sent them too few
    calibration tokens (:class:`qtune.calibration.ExpertFallback`: module, expert, tokens).
    """

    layers: list[LayerReport] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    expert_fallbacks: list = dataclasses.field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def bits_per_param(self) -> float:
        params = sum(r.bytes_after * 8 / r.bits_per_param for r in self.layers if r.bits_per_param)
        return 8.0 * self.bytes_after / params if params else 0.0

    def summary(self) -> str:
        text = (f"{len(self.layers)} layers quantized, {len(self.skipped)} skipped: "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
                f"({self.bits_per_param:.2f} bits/param)")
        if self.expert_fallbacks:
            text += (f"\n{len(self.expert_fallbacks)} experts got too few calibration tokens for GPTQ and were "
                     "quantized round-to-nearest: " + ", ".join(map(str, self.expert_fallbacks)))
        return text


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` and transformers ``Conv1D`` in ``model``."""
    return [(n, m) for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_conv1d(m)) and not isinstance(m, QuantLinear)]


def config_for(name: str, default: QuantConfig | None, skip_modules: tuple[str, ...] | list[str],
               overrides: Mapping[str, QuantConfig | None]) -> QuantConfig | None:
    """The config for one layer: the last matching override wins, skip patterns give ``None``."""
    if any(name_matches(name, p) for p in skip_modules):
        return None
    chosen = default
    for pattern, cfg in overrides.items():
        if name_matches(name, pattern):
            chosen = cfg
    return chosen


def unquantizable_modules(model: nn.Module, *, output_embeddings: bool = True) -> tuple[str, ...]:
    """Names of modules whose weight must stay float: tied weights, ``_keep_in_fp32_modules``, and
    (``output_embeddings=True``) the output embedding layer (``lm_head``, GPT-NeoX's ``embed_out``)."""
    return tuple(sorted(_model_skips(model, output_embeddings=output_embeddings)))


def _model_skips(model: nn.Module, *, output_embeddings: bool) -> dict[str, str]:
    """``{name or pattern: reason}`` of what a (transformers) model never lets qtune quantize."""
    names: dict[str, str] = {}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for key in list(tied.keys()) + list(tied.values()):
        names.setdefault(str(key).removesuffix(".weight"), "tied weights")
    for pattern in getattr(model, "_keep_in_fp32_modules", None) or ():
        names.setdefault(pattern, "kept in fp32 by the model")
    if output_embeddings and hasattr(model, "get_output_embeddings"):
        out = model.get_output_embeddings()
        if out is not None:
            for n, m in model.named_modules():
                if m is out:
                    names.setdefault(n, "output embeddings")
    return names


@dataclasses.dataclass
class LayerPlan(MappingABC):
    """Which linear layers get which config (a read-only ``{name: QuantConfig}`` mapping, module order), and
    why the other linear layers stay float (:attr:`skipped`, ``{name: reason}``).

    Fused mixture-of-experts modules (:func:`qtune.nn.experts.fused_experts_modules`) are planned apart, in
    :attr:`experts` (``{experts module name: QuantConfig}``), so code that walks the linear layers of a plan
    never meets them; their skips join :attr:`skipped`.
    """

    configs: dict[str, QuantConfig] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    experts: dict[str, QuantConfig] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> QuantConfig:
        return self.configs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.configs)

    def __len__(self) -> int:
        return len(self.configs)


def plan_layers(model: nn.Module, config: QuantConfig | None, *, skip_modules=None,
                overrides: Mapping[str, QuantConfig | None] | None = None,
                layers: Mapping[str, QuantConfig | None] | None = None, model_skips: bool = True) -> LayerPlan:
    """The layer plan of ``model`` (which may live on the meta device).

    Args:
        model: any ``nn.Module``.
        config: the default config (``None``: only layers named in ``overrides`` are quantized).
        skip_modules: name patterns kept in full precision; ``None``: :data:`DEFAULT_SKIP` plus the model's
            output embeddings.
        overrides: ``{pattern: config or None}``; the last matching pattern wins, ``None`` skips.
        layers: an explicit ``{layer name: config or None}`` map, used instead of ``config``/``skip_modules``/
            ``overrides``.
        model_skips: also skip what the model never lets qtune quantize (tied weights, ``_keep_in_fp32_modules``).
    The same rules (``skip_modules``, ``overrides``, ``layers``) place the fused experts modules in
    :attr:`LayerPlan.experts`: ``"experts"`` in ``skip_modules`` keeps them all float.

    Raises:
        ValueError: ``layers`` names a module that is neither a linear layer nor a fused experts module of
            ``model``.
    """
    linears = [n for n, _ in linear_modules(model)]
    experts = [n for n, _ in fused_experts_modules(model)]
    plan = LayerPlan()
    if layers is not None:
        missing = sorted(set(layers) - set(linears) - set(experts))
        if missing:
            raise ValueError(f"quantization_config.layers names {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"which are not linear layers (or fused experts modules) of {type(model).__name__}")
        for name in layers:
            if layers[name] is not None:
                (plan.experts if name in experts else plan.configs)[name] = layers[name]
        plan.skipped.update((n, "not in the explicit layers map") for n in linears + experts
                            if n not in plan.configs and n not in plan.experts)
        return plan
    skips = {p: f"skip_modules pattern {p!r}" for p in (DEFAULT_SKIP if skip_modules is None else skip_modules)}
    if model_skips:
        for p, why in _model_skips(model, output_embeddings=skip_modules is None).items():
            skips.setdefault(p, why)
    overrides = dict(overrides or {})
    modules = dict(model.named_modules())
    for name in linears + experts:
        why = next((r for p, r in skips.items() if name_matches(name, p)), None)
        if why is None and _own_forward(modules[name]):
            why = f"{type(modules[name]).__name__} subclasses nn.Linear with its own forward (e.g. a MoE router)"
        if why is None:
            cfg = config_for(name, config, (), overrides)
            why = "no format (default None)" if cfg is None else None
            if cfg is None and any(name_matches(name, p) for p in overrides):
                why = "override None"
        if why is None:
            (plan.experts if name in experts else plan.configs)[name] = cfg
        else:
            plan.skipped[name] = why
    return plan


# nn.Linear subclasses whose own forward is still ``y = x Wᵀ + b`` (so a QuantLinear can stand in), by
# "module.QualName": Falcon's FalconLinear writes the matmul out (``input @ self.weight.T``) for its own reasons.
PLAIN_LINEAR_SUBCLASSES = {"transformers.models.falcon.modeling_falcon.FalconLinear"}


def _own_forward(module: nn.Module) -> bool:
    """An ``nn.Linear`` subclass whose forward is not ``nn.Linear``'s (Phi-MoE's router returns logits, weights and
    indices): a ``QuantLinear`` computes ``x Ŵᵀ + b`` only, so it cannot stand in for it. Subclasses listed in
    :data:`PLAIN_LINEAR_SUBCLASSES` compute exactly that and are quantized."""
    cls = type(module)
    return (isinstance(module, nn.Linear) and cls.forward is not nn.Linear.forward
            and f"{cls.__module__}.{cls.__qualname__}" not in PLAIN_LINEAR_SUBCLASSES)


def quantize_model(model: nn.Module, config: QuantConfig | None, *, skip_modules=DEFAULT_SKIP,
                   overrides: Mapping[str, QuantConfig | None] | None = None,
                   layer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                   plan: LayerPlan | None = None) -> QuantizationReport:
    """Replace the linear layers of ``model`` in place by quantized layers.

    Args:
        model: any ``nn.Module``.
        config: the default format config (``None``: only layers named in ``overrides`` are quantized).
        skip_modules: name patterns left in full precision (default ``("lm_head",)``).
        overrides: ``{pattern: config or None}`` per-module overrides, e.g. ``{"down_proj": Int8Config()}``
            for mixed precision; ``None`` skips the matching layers.
        layer_kwargs: ``{layer name: kwargs}`` passed to ``from_float`` (GPTQ: ``{"hessian": H}``).
        plan: a :class:`LayerPlan` to apply instead of building one from ``config``/``skip_modules``/``overrides``.
    Fused mixture-of-experts modules are replaced by :class:`~qtune.nn.experts.QuantExperts` (the plan's
    :attr:`~LayerPlan.experts`; ``skip_modules=["experts", ...]`` keeps them float).

    Returns:
        :class:`QuantizationReport`.
    Raises:
        ValueError: an experts module is planned with a format that needs calibration (GPTQ).
    """
    if plan is None:
        plan = plan_layers(model, config, skip_modules=tuple(skip_modules), overrides=overrides, model_skips=False)
    layer_kwargs = layer_kwargs or {}
    report = QuantizationReport()
    report.skipped.extend(plan.skipped)
    for name, cfg in plan.items():
        report.layers.append(quantize_layer(model, name, cfg, **dict(layer_kwargs.get(name, {}))))
    for name, cfg in plan.experts.items():
        report.layers.append(quantize_experts(model, name, cfg))
    return report


def quantize_experts(model: nn.Module, name: str, config: QuantConfig) -> LayerReport:
    """Replace the fused experts module ``name`` of ``model`` by its :class:`QuantExperts`, in place."""
    module = model.get_submodule(name)
    layer = QuantExperts.from_float(module, config, name=name)
    before = sum(getattr(module, n).numel() * getattr(module, n).element_size() for n in layer.weight_names)
    set_submodule(model, name, layer)
    return LayerReport(name, config.format, layer.bits_per_parameter(), before, layer.quantized_bytes())


def quantize_layer(model: nn.Module, name: str, config: QuantConfig, **kwargs: Any) -> LayerReport:
    """Replace the linear layer ``name`` of ``model`` by its quantization with ``config``, in place.

    Args:
        kwargs: format-specific extras for ``from_float`` (GPTQ: ``hessian``).
    """
    module = model.get_submodule(name)
    weight, _ = float_weight_of(module, name)
    before = weight.numel() * weight.element_size()
    layer = layer_class_for(config).from_float(module, config, name=name, **kwargs)
    set_submodule(model, name, layer)
    return LayerReport(name, config.format, layer.bits_per_parameter(), before, layer.quantized_bytes())


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``QuantLinear`` by an ``nn.Linear`` (or ``Conv1D``) holding its dequantized weight
    (:meth:`QuantLinear.to_dense`), and every :class:`QuantExperts` by the model's float experts module
    (:meth:`QuantExperts.to_float`), in place; returns ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            set_submodule(model, name, m.to_dense(dtype))
        elif isinstance(m, QuantExperts):
            set_submodule(model, name, m.to_float(dtype))
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
