"""Former home of the checkpoint readers and writers, now :mod:`qtune.integrations.layouts` (one module per
layout); these names stay importable from here for existing callers."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import QuantLinear
from .layouts import load_model, read_config_json, save_quantized
from .layouts.bnb import bnb_kind, bnb_tensors
from .layouts.gptq import gptq_tensors
from .layouts.qtune import as_qtune_config as _as_qtune_config  # noqa: F401  (qtune/inspect.py)
from .safetensors_header import LazyTensor, safetensors_files


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``QuantLinear`` by an ``nn.Linear`` (or ``Conv1D``) holding its dequantized weight."""
    from transformers.pytorch_utils import Conv1D

    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        w = m.dequantize(dtype or m.compute_dtype)
        if m.from_conv1d:
            new = Conv1D(m.out_features, m.in_features)
            new.weight = nn.Parameter(w.t().contiguous())
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
            new.weight = nn.Parameter(w)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().to(w.dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


__all__ = ["load_model", "save_quantized", "dequantize_model", "bnb_tensors", "gptq_tensors", "bnb_kind",
           "safetensors_files", "read_config_json", "LazyTensor"]
