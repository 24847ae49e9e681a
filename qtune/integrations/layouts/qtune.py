"""qtune's own layout (``quant_method: "qtune"``): ``save_pretrained`` of the qtune layers, any registered format.

Each quantized layer is stored generically: its config dict in ``config.json``'s ``quantization_config.layers``
and its buffers (packed weights, scales, code tables...) under their own names in the safetensors files.
Reloading goes through ``from_pretrained`` and :class:`~qtune.integrations.transformers.QTuneHfQuantizer`,
which rebuilds each layer from its config (the format registry's layer class) on the meta device and loads
the buffers into it, so a format registered from outside qtune round-trips without any code here knowing it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ...formats import QuantConfig
from ..transformers import QUANT_METHOD, QTuneConfig, mark_quantized
from ..safetensors_header import Headers
from .base import Layout, register_layout


def can_store(cfg: QuantConfig) -> bool:
    """Every format: the layout stores a layer's config dict and buffers, whatever they are."""
    return isinstance(cfg, QuantConfig)


def as_qtune_config(config: Any) -> QTuneConfig:
    """``config`` (a ``QTuneConfig``, a qtune ``QuantConfig``, a format name or a dict) as a ``QTuneConfig``.

    Raises:
        TypeError: anything else.
    """
    if isinstance(config, QTuneConfig):
        return config
    if isinstance(config, QuantConfig):
        d = config.to_dict()
        return QTuneConfig(d.pop("format"), compute_dtype=d.pop("compute_dtype", None), **d)
    if isinstance(config, str):
        return QTuneConfig(config)
    if isinstance(config, dict):
        return QTuneConfig(**config)  # no "format": QTuneConfig's default
    raise TypeError(f"config must be a QTuneConfig, a qtune QuantConfig, a format name or a dict, got {type(config).__name__}")


def read(path: Path, qc: dict[str, Any], headers: Headers, *, dtype: Any, kwargs: dict[str, Any],
         auto_class: Any) -> nn.Module:
    """Load a qtune folder through ``from_pretrained`` (the quantizer checks the tensors against the config)."""
    return auto_class.from_pretrained(path, dtype=dtype, **kwargs)


def write(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` with ``quant_method: "qtune"`` (a model quantized outside ``from_pretrained`` is
    marked first, so the folder carries every layer's config)."""
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(quantizer, "quantization_config", None)
    if qconfig is None or getattr(qconfig, "quant_method", None) != QUANT_METHOD:
        mark_quantized(model)
    model.save_pretrained(folder)


LAYOUT = register_layout(Layout(name="qtune", quant_method=QUANT_METHOD, holds="every format", can_store=can_store,
                                detects=lambda qc: str(qc.get("quant_method", "")) == QUANT_METHOD, read=read,
                                write=write, stores_experts=True, float_offsets=True, describe=lambda qc: str(qc.get("format") or ""),
                                declares=lambda qc: {"qtune": qc},
                                note="qtune layout (`quant_method: qtune`; load with `qtune.load_model` or "
                                     "transformers after `import qtune`)"))

__all__ = ["LAYOUT", "can_store", "as_qtune_config", "read", "write"]
