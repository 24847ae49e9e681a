"""Float storage of the packed weight (for FSDP, as bitsandbytes' quant_storage): same bytes, same results."""
import pytest
import torch
from torch import nn

from qtune.nn import QuantLinear, packed_storage_parameters, set_storage_dtype
from tests.helpers import FORMAT_CONFIGS, make_layer


@pytest.mark.parametrize("key", sorted(FORMAT_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_storage_is_a_view_and_changes_nothing(key, dtype):
    layer = make_layer(key, nn.Linear(64, 40), in_features=64)
    packed = layer.packed().clone()
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    gx = x.grad.clone()

    layer.set_storage_dtype(dtype)
    stored = getattr(layer, layer.packed_name)
    assert isinstance(stored, nn.Parameter) and stored.dtype == dtype and not stored.requires_grad
    assert layer.storage_dtype == dtype and torch.equal(layer.packed(), packed)
    assert layer.quantized_bytes() == sum(b.numel() * b.element_size() for b in layer.buffers()) \
        + packed.numel() * packed.element_size()
    x.grad = None
    y2 = layer(x)
    y2.sum().backward()
    assert torch.equal(y2, y) and torch.equal(x.grad, gx)

    # module dtype conversions move the bytes but never cast them
    layer.to(torch.float64 if dtype != torch.float64 else torch.float32)
    layer.half()
    assert getattr(layer, layer.packed_name).dtype == dtype and torch.equal(layer.packed(), packed)

    layer.set_storage_dtype(None)
    assert layer.packed_name in dict(layer.named_buffers()) and torch.equal(layer.packed(), packed)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]


def test_model_level_and_bad_row_size():
    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 8))
    model[0] = make_layer("nf4", model[0], in_features=64)
    model[1] = make_layer("int8", model[1], in_features=40)
    assert set_storage_dtype(model, "bfloat16") == 2
    assert len(packed_storage_parameters(model)) == 2
    assert set_storage_dtype(model, None) == 2 and packed_storage_parameters(model) == []
    odd = make_layer("int8", nn.Linear(33, 8), in_features=33)  # 33 int8 bytes per row
    with pytest.raises(ValueError, match=r"33 bytes per row, not a multiple of torch.bfloat16"):
        odd.set_storage_dtype(torch.bfloat16)
    assert isinstance(odd, QuantLinear) and odd.storage_dtype == torch.int8  # untouched


def test_a_cast_storage_is_detected_not_misread():
    layer = make_layer("nf4", nn.Linear(64, 40), in_features=64)
    layer.set_storage_dtype(torch.bfloat16)
    # what FSDP mixed precision with another parameter dtype would do behind the module's back
    layer._parameters["weight"] = nn.Parameter(layer.weight.detach().float(), requires_grad=False)
    with pytest.raises(RuntimeError, match="stored as torch.bfloat16 was cast to torch.float32"):
        layer(torch.randn(2, 64))
