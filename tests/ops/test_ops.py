"""torch.library checks for every qtune:: op and its autograd rule."""
import pytest
import torch
from torch import nn

import qtune  # noqa: F401  (registers the ops)
from qtune.ops import GRAD_INPUT_OPS, LINEAR_OPS
from tests.helpers import FORMAT_CONFIGS, make_layer


@pytest.fixture(params=sorted(FORMAT_CONFIGS))
def layer(request):
    return make_layer(request.param, nn.Linear(64, 48))


def test_opcheck_linear_ops(layer):
    x = torch.randn(3, 5, 64, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    torch.library.opcheck(LINEAR_OPS[layer.op_format], (x, *layer.weight_args(), bias))
    torch.library.opcheck(LINEAR_OPS[layer.op_format], (x.detach(), *layer.weight_args(), None))
    torch.library.opcheck(GRAD_INPUT_OPS[layer.op_format], (torch.randn(3, 5, 48), *layer.weight_args()))


def test_opcheck_dequantize_ops():
    for key in ("nf4", "nf4-dq", "int8-zp-g32", "gptq3-act"):
        lay = make_layer(key, nn.Linear(64, 48))
        w = lay.weight_args()
        if lay.op_format == "4bit":
            torch.library.opcheck(torch.ops.qtune.dequantize_4bit.default, (*w, torch.bfloat16))
        elif lay.op_format == "int8":
            torch.library.opcheck(torch.ops.qtune.dequantize_int8.default, (*w, torch.float16))
        else:
            torch.library.opcheck(torch.ops.qtune.dequantize_gptq.default, (*w, torch.float32))


def test_fake_tensor_shapes(layer):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = LINEAR_OPS[layer.op_format](torch.empty(2, 7, 64), *layer.weight_args(), None)
    assert tuple(y.shape) == (2, 7, 48)


def test_backward_saves_packed_not_dense(layer):
    saved = []
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert saved, "the autograd rule saved nothing"
    dense = [t for t in saved if t.is_floating_point() and tuple(t.shape) == (48, 64)]
    assert not dense, "a dequantized weight was saved for backward"
    assert x.grad is not None


def test_torch_compile_fullgraph_traces():
    layer = make_layer("nf4", nn.Linear(64, 48))
    fn = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fn(x), layer(x))
