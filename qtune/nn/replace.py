"""The module-swapping pass: replace every linear layer of a model by its ``QuantLinear``."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping

from torch import nn

from ..formats.base import QuantConfig
from .base import QuantLinear, float_weight_of, is_conv1d, layer_class_for

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
    """Bytes before/after for each replaced layer, and totals over the replaced layers."""

    layers: list[LayerReport] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

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
        return (f"{len(self.layers)} layers quantized, {len(self.skipped)} skipped: "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
                f"({self.bits_per_param:.2f} bits/param)")


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


def quantize_model(model: nn.Module, config: QuantConfig | None, *, skip_modules=DEFAULT_SKIP,
                   overrides: Mapping[str, QuantConfig | None] | None = None,
                   layer_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> QuantizationReport:
    """Replace the linear layers of ``model`` in place by quantized layers.

    Args:
        model: any ``nn.Module``.
        config: the default format config (``None``: only layers named in ``overrides`` are quantized).
        skip_modules: name patterns left in full precision (default ``("lm_head",)``).
        overrides: ``{pattern: config or None}`` per-module overrides, e.g. ``{"down_proj": Int8Config()}``
            for mixed precision; ``None`` skips the matching layers.
        layer_kwargs: ``{layer name: kwargs}`` passed to ``from_float`` (GPTQ: ``{"hessian": H}``).
    Returns:
        :class:`QuantizationReport`.
    """
    overrides = dict(overrides or {})
    layer_kwargs = layer_kwargs or {}
    report = QuantizationReport()
    for name, module in linear_modules(model):
        cfg = config_for(name, config, tuple(skip_modules), overrides)
        if cfg is None:
            report.skipped.append(name)
            continue
        weight, bias = float_weight_of(module, name)
        before = weight.numel() * weight.element_size()
        qlayer = layer_class_for(cfg).from_float(module, cfg, name=name, **dict(layer_kwargs.get(name, {})))
        set_submodule(model, name, qlayer)
        report.layers.append(LayerReport(name, cfg.format, qlayer.bits_per_parameter(), before, qlayer.quantized_bytes()))
    return report


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
