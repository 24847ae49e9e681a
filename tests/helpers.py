"""Shared test fixtures: one small quantized layer of every format."""
import torch
from torch import nn

from qtune.formats import AffineConfig, FP4Config, GPTQConfig, Int8Config, LLMInt8Config, NF4Config, RTNConfig
from qtune.formats.gguf import GGUFQ4_1Config, GGUFQ5_0Config, GGUFQ8_0Config
from qtune.formats.gptq import GPTQHessian
from qtune.nn import layer_class_for

FORMAT_CONFIGS = {
    "nf4": NF4Config(),
    "nf4-dq": NF4Config(double_quant=True, blocksize=32),
    "fp4": FP4Config(),
    "int8": Int8Config(),
    "int8-zp-g32": Int8Config(symmetric=False, group_size=32),
    "llm_int8": LLMInt8Config(),
    "gptq4-g32": GPTQConfig(bits=4, group_size=32),
    "gptq3-act": GPTQConfig(bits=3, group_size=32, static_groups=False),  # classic act-order: permuted g_idx
    "rtn2": RTNConfig(bits=2, group_size=32),
    "rtn8": RTNConfig(bits=8, group_size=-1),
    "gguf_q4_1": GGUFQ4_1Config(),
    "gguf_q5_0": GGUFQ5_0Config(),
    "gguf_q8_0": GGUFQ8_0Config(),
    "affine3-g32": AffineConfig(bits=3, group_size=32),
}


def make_layer(key: str, module: nn.Module, *, in_features: int | None = None):
    cfg = FORMAT_CONFIGS[key]
    kwargs = {}
    if isinstance(cfg, GPTQConfig):
        h = GPTQHessian(in_features or _in_features(module))
        h.add_batch(torch.randn(256, h.H.shape[0]))
        kwargs["hessian"] = h
    return layer_class_for(cfg).from_float(module, cfg, name=key, **kwargs)


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
