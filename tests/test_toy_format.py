"""A format that lives in one place: this module.

``toy`` (symmetric per-row absmax, codes stored as ``uint8`` = code + 128, one fp32 scale per row) is defined
here entirely: its config, its reference quantize/dequantize, its op family and its layer, each registered
through qtune's public registries. Nothing in qtune names it, yet it runs the whole path: quantize while
loading → save (qtune layout) → reload → a QLoRA step → merged export → quantized export.
``docs/adding-a-format.md`` walks through this file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

import qtune
from qtune.formats import QuantConfig, check_weight, get_format, register_format
from qtune.nn import QuantLinear, layer_class_for, register_layer
from qtune.ops import OpFamily, register_op_family


# -- 1. the config: everything qtune asks about the format ------------------------------------------
@dataclasses.dataclass(frozen=True)
class ToyConfig(QuantConfig):
    """Symmetric per-row int8 codes (stored offset by 128 as uint8) and one fp32 scale per row."""

    format: ClassVar[str] = "toy"
    bits: ClassVar[int] = 8
    op_family: ClassVar[str] = "toy"


# -- 2. the reference (the spec) --------------------------------------------------------------------
def toy_quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """float [N, K] → (codes uint8 [N, K], scale fp32 [N]) with ``Ŵ = (codes − 128) · scale / 127``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12)
    codes = torch.round(w / scale[:, None] * 127).clamp(-127, 127) + 128
    return codes.to(torch.uint8), scale


def toy_dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return ((codes.float() - 128) * (scale[:, None] / 127)).to(dtype)


# -- 3. the op family: qtune::linear_toy and qtune::linear_toy_grad_input ----------------------------
register_op_family(OpFamily(
    "toy", "Tensor codes, Tensor scale",
    dequantize=lambda codes, scale, dtype: toy_dequantize(codes, scale, dtype),
    shape=lambda codes, scale: tuple(codes.shape)))


# -- 4. the layer --------------------------------------------------------------------------------------
@register_layer(ToyConfig)
class LinearToy(QuantLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool, config: ToyConfig, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias, config, **kw)
        device = kw.get("device")
        # the main packed tensor is called `weight` (QuantLinear.packed_name): peft finds the layer's device by it
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))

    def quantize_(self, weight: Tensor, *, name: str = "", **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{name}: unexpected arguments {sorted(kwargs)}")
        check_weight(weight, name=name or "weight")
        self.weight, self.scale = toy_quantize(weight)

    def weight_args(self) -> tuple:
        return (self.packed(), self.scale)


register_format(ToyConfig)


# -- the proof ------------------------------------------------------------------------------------------
def test_registries_answer_for_the_toy_format():
    assert get_format("toy") is ToyConfig
    assert "toy" in qtune.formats.format_names()
    assert qtune.formats.parse_format_spec("toy").config() == ToyConfig()
    assert layer_class_for(ToyConfig()) is LinearToy
    lin = torch.nn.Linear(32, 8)
    layer = LinearToy.from_float(lin, ToyConfig())
    torch.testing.assert_close(layer.dequantize(torch.float32), lin.weight.detach(), atol=0.02, rtol=0)
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize(torch.float32).sum(0).expand(3, -1))


def test_config_without_bits_is_refused():
    @dataclasses.dataclass(frozen=True)
    class NoBits(QuantConfig):
        format: ClassVar[str] = "nobits"
        op_family: ClassVar[str] = "toy"

    with pytest.raises(ValueError, match="bits"):
        register_format(NoBits)


def _batch(tok, text: str) -> dict[str, Tensor]:
    enc = tok([text[i:i + 200] for i in range(0, 800, 200)], return_tensors="pt", truncation=True, max_length=48,
              padding="max_length")
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc


def test_toy_format_end_to_end(tmp_path):
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from qtune.export import export_merged, export_quantized
    from tests.train.models import CORPUS, save_tiny_model_dir

    torch.manual_seed(0)
    float_dir = save_tiny_model_dir(tmp_path / "float")
    tok = AutoTokenizer.from_pretrained(float_dir)
    batch = _batch(tok, CORPUS)

    # quantize while loading, save in the qtune layout, reload: same layers, same logits
    model = qtune.load_model(float_dir, qtune.QTuneConfig("toy", compute_dtype="float32"), dtype=torch.float32)
    toy_layers = [m for m in model.modules() if isinstance(m, LinearToy)]
    assert toy_layers, "no layer was quantized to the toy format"
    quant_dir = qtune.save_quantized(model, tmp_path / "toy", layout="qtune", tokenizer=tok)
    reloaded = qtune.load_model(quant_dir, dtype=torch.float32)
    assert sum(isinstance(m, LinearToy) for m in reloaded.modules()) == len(toy_layers)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)

    # a QLoRA step on the reloaded model: adapter gradients flow through qtune::linear_toy, the loss drops
    peft_model = qtune.get_peft_model(reloaded, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(4):
        loss = peft_model(**batch).loss
        opt.zero_grad()
        loss.backward()
        if step == 1:  # lora_B starts at zero, so lora_A's gradient is zero on the first step only
            grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)

    # merged export (plain transformers checkpoint), then merged and re-quantized to the toy format
    common = dict(base=str(quant_dir), base_format="pretrained", log=lambda line: None)
    merged = export_merged(adapter_dir, tmp_path / "merged", dtype="fp32", **common)
    assert (tmp_path / "merged" / "config.json").is_file(), merged
    export_quantized(adapter_dir, tmp_path / "requantized", format="toy", layout="qtune", dtype="fp32", **common)
    again = qtune.load_model(tmp_path / "requantized", dtype=torch.float32)
    assert any(isinstance(m, LinearToy) for m in again.modules())
