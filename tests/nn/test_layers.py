"""QuantLinear layers: gradients, Conv1D, dtypes, train/eval, explicit conversion."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qtune.formats import GPTQConfig, NF4Config
from qtune.nn import Linear4bit, LinearGPTQ, QuantLinear
from tests.helpers import FORMAT_CONFIGS, make_layer


def _dense(module):
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("key", sorted(FORMAT_CONFIGS))
def test_input_and_bias_grads_match_dequantized_weight(key, kind):
    src = nn.Linear(64, 40) if kind == "linear" else Conv1D(40, 64)
    layer = make_layer(key, src, in_features=64)
    assert (layer.in_features, layer.out_features) == (64, 40)
    assert layer.from_conv1d == (kind == "conv1d")
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 9, 64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)

    w = layer.dequantize(torch.float32)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = layer.bias.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w, b_ref)
    y_ref.backward(gy)
    # LLM.int8 quantizes activations in its forward; its gradient is still dy·Ŵ exactly
    if key != "llm_int8":
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad)
    # frozen weight: nothing of the quantized layer but the bias is a parameter
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    # the quantized weight approximates the float one
    rel = (w - _dense(src).detach()).norm() / _dense(src).detach().norm()
    # 3 bits on uniform weights: 8 levels give ~1/7 before affine's grid is shifted to hold 0 (clipping one end)
    assert rel < {"rtn2": 0.6, "gptq3-act": 0.3, "affine3-g32": 0.2}.get(key, 0.15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compute_dtype(dtype):
    layer = Linear4bit.from_float(nn.Linear(64, 32), NF4Config(compute_dtype=str(dtype).split(".")[1]))
    assert layer.compute_dtype == dtype and layer.bias.dtype == dtype
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # output comes back in the input's dtype
    ref = torch.nn.functional.linear(x.to(dtype), layer.dequantize(dtype), layer.bias).float()
    torch.testing.assert_close(y, ref)


def test_from_float_keeps_source_dtype_by_default():
    layer = Linear4bit.from_float(nn.Linear(64, 32).to(torch.bfloat16), NF4Config())
    assert layer.compute_dtype == torch.bfloat16


def test_eval_then_train_keeps_gradients():
    layer = make_layer("nf4", nn.Linear(64, 32))
    before = layer.weight.clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    layer.train()
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    layer.eval()
    x2 = torch.randn(2, 64, requires_grad=True)
    layer(x2).sum().backward()  # bitsandbytes on CPU loses this gradient after eval(); qtune must not
    assert x2.grad is not None and x2.grad.abs().sum() > 0
    assert torch.equal(layer.weight, before)


def test_to_does_not_quantize_or_change_packed_data():
    layer = make_layer("nf4", nn.Linear(64, 32))
    packed = layer.weight.clone()
    layer.to(torch.float16)  # casts floating buffers/params only
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, packed)


def test_gptq_without_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="calibration"):
        LinearGPTQ.from_float(nn.Linear(64, 32), GPTQConfig(), name="mlp.up_proj")


def test_wrong_input_width():
    layer = make_layer("int8", nn.Linear(64, 32))
    with pytest.raises(ValueError, match="63 features, expected 64"):
        layer(torch.randn(2, 63))


def test_not_a_linear():
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        Linear4bit.from_float(nn.Conv2d(3, 3, 1), NF4Config(), name="conv")


def test_repr_and_bits():
    layer = make_layer("nf4", nn.Linear(256, 128))
    assert "format=nf4, bits=4" in repr(layer)
    # 4 bits + one fp32 absmax per 64 weights = 4.5 bits/param (+ the tiny 16-entry code table)
    table_bits = 16 * 32 / (256 * 128)
    assert abs(layer.bits_per_parameter() - 4.5 - table_bits) < 1e-6
    dq = Linear4bit.from_float(nn.Linear(1024, 1024), NF4Config(double_quant=True))
    assert 4.125 < dq.bits_per_parameter() < 4.14  # 8-bit absmax per 64 weights + fp32 per 256 blocks
    assert isinstance(layer, QuantLinear)
