"""Quantization formats: one module each, config dataclass + reference quantize/dequantize (the spec)."""
from __future__ import annotations

from typing import Any

from .base import QuantConfig, check_weight, parse_dtype
from .gptq import GPTQConfig, RTNConfig
from .int8 import Int8Config, LLMInt8Config
from .nf4 import FP4Config, NF4Config

CONFIGS: dict[str, type[QuantConfig]] = {
    cls.format: cls for cls in (NF4Config, FP4Config, Int8Config, LLMInt8Config, GPTQConfig, RTNConfig)
}


def config_from_dict(data: dict[str, Any]) -> QuantConfig:
    """Build a config from ``{"format": name, **fields}`` (the inverse of ``QuantConfig.to_dict``).

    Raises:
        ValueError: unknown format or field (the message lists the allowed ones).
    """
    import dataclasses

    data = dict(data)
    fmt = data.pop("format", None)
    if fmt not in CONFIGS:
        raise ValueError(f"quantization format {fmt!r} is not one of {sorted(CONFIGS)}")
    cls = CONFIGS[fmt]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for format {fmt!r}; allowed: {sorted(allowed)}")
    return cls(**data)


__all__ = ["QuantConfig", "NF4Config", "FP4Config", "Int8Config", "LLMInt8Config", "GPTQConfig", "RTNConfig",
           "CONFIGS", "config_from_dict", "check_weight", "parse_dtype"]
