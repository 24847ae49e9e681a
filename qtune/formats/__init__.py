"""Quantization formats: one module each, config dataclass + reference quantize/dequantize (the spec).

The registry (:mod:`.registry`) maps a format name to its config class; the config class declares
everything about the format (see :class:`QuantConfig`).
"""
from __future__ import annotations

from .affine import AffineConfig
from .base import CliOption, QuantConfig, check_weight, parse_dtype
from .gguf import GGUF_CONFIGS, GGUFConfig
from .gptq import GPTQConfig, RTNConfig
from .int8 import Int8Config, LLMInt8Config
from .nf4 import FP4Config, NF4Config
from .registry import (CONFIGS, FormatSpec, config_from_dict, format_names, get_format, parse_format_spec,
                       register_format)

for _cls in (NF4Config, FP4Config, Int8Config, LLMInt8Config, GPTQConfig, RTNConfig, *GGUF_CONFIGS, AffineConfig):
    register_format(_cls)
del _cls

__all__ = ["QuantConfig", "NF4Config", "FP4Config", "Int8Config", "LLMInt8Config", "GPTQConfig", "RTNConfig",
           "CONFIGS", "config_from_dict", "check_weight", "parse_dtype", "register_format", "get_format",
           "format_names", "parse_format_spec", "FormatSpec", "CliOption", "GGUFConfig", "GGUF_CONFIGS",
           "AffineConfig"]
