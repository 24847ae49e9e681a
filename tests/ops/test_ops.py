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
    torch.library.opcheck(LINEAR_OPS[layer.op_family], (x, *layer.weight_args(), bias))
    torch.library.opcheck(LINEAR_OPS[layer.op_family], (x.detach(), *layer.weight_args(), None))
    torch.library.opcheck(GRAD_INPUT_OPS[layer.op_family], (torch.randn(3, 5, 48), *layer.weight_args()))


def test_opcheck_dequantize_ops():
    for key in ("nf4", "nf4-dq", "int8-zp-g32", "gptq3-act", "affine3-g32"):
        lay = make_layer(key, nn.Linear(64, 48))
        w = lay.weight_args()
        if lay.op_family == "4bit":
            torch.library.opcheck(torch.ops.qtune.dequantize_4bit.default, (*w, torch.bfloat16))
        elif lay.op_family == "affine":
            torch.library.opcheck(torch.ops.qtune.dequantize_affine.default, (*w, torch.bfloat16))
        elif lay.op_family == "int8":
            torch.library.opcheck(torch.ops.qtune.dequantize_int8.default, (*w, torch.float16))
        else:
            torch.library.opcheck(torch.ops.qtune.dequantize_gptq.default, (*w, torch.float32))


def test_fake_tensor_shapes(layer):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = LINEAR_OPS[layer.op_family](torch.empty(2, 7, 64), *layer.weight_args(), None)
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


# -- no silent slow path ----------------------------------------------------------------------------------
def test_slow_path_reason_names_cause_and_fix(monkeypatch):
    from qtune import kernels
    from qtune.ops import library

    assert library.slow_path_reason("cpu") is None and library.slow_path_reason("meta") is None
    monkeypatch.setattr(library, "_registration_failure", ["AttributeError: module 'triton.language' has no attribute 'gather'"])
    reason = library.slow_path_reason("cuda")
    assert "registering qtune's Triton kernels failed" in reason and "gather" in reason and "Fix:" in reason
    monkeypatch.setattr(library, "_registration_failure", [])
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    reason = library.slow_path_reason("cuda")
    assert "Triton is not installed" in reason and "pip install triton" in reason
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(kernels, "registered", lambda: [])
    reason = library.slow_path_reason("cuda")
    assert "CUDA was not available when qtune was imported" in reason and "qtune.kernels.register()" in reason
    monkeypatch.setattr(kernels, "registered", lambda: ["linear_4bit"])
    assert library.slow_path_reason("cuda") is None
    assert "no kernels for 'xpu'" in library.slow_path_reason("xpu")


def test_reference_kernels_warn_once_per_process_for_a_device_tensor(monkeypatch):
    """The reference linear and grad_input kernels ask about their tensor's device type; a CUDA check is
    faked by reporting the CPU tensors as 'cuda' to the reason function."""
    from qtune import kernels
    from qtune.ops import library

    monkeypatch.setattr(library, "_slow_path_warned", set())
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    real = library.slow_path_reason
    monkeypatch.setattr(library, "slow_path_reason", lambda device_type: real("cuda"))
    lay = make_layer("nf4", nn.Linear(64, 48))
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="Triton is not installed") as record:
        lay(x).sum().backward()
        lay(x).sum().backward()
    assert len([w for w in record if "reference kernels" in str(w.message)]) == 1
    # each reference kernel asks on its own: forward alone, and grad_input alone
    monkeypatch.setattr(library, "_slow_path_warned", set())
    with pytest.warns(RuntimeWarning, match="Triton is not installed"), torch.no_grad():
        lay(x)
    monkeypatch.setattr(library, "_slow_path_warned", set())
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        GRAD_INPUT_OPS["4bit"](torch.randn(2, 48), *lay.weight_args())


# -- autocast ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["nf4", "int8-zp-g32", "llm_int8", "gptq4-g32"])
def test_autocast_computes_in_the_autocast_dtype_like_nn_linear(key):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    lay = make_layer(key, lin)
    assert lay.compute_dtype == torch.float32
    x = torch.randn(3, 64)
    with torch.autocast("cpu", torch.bfloat16):
        y = lay(x)
        y_lin = lin(x)
    assert y.dtype == y_lin.dtype == torch.bfloat16
    # the same op on bf16 inputs outside autocast: the layer really computed in bf16 (not fp32, then cast)
    expect = LINEAR_OPS[lay.op_family](x.to(torch.bfloat16), *lay.weight_args(), lay.bias.to(torch.bfloat16))
    assert torch.equal(y, expect)
    fp32 = lay(x)
    assert fp32.dtype == torch.float32 and not torch.equal(fp32.to(torch.bfloat16), y)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        lay(xg).float().sum().backward()
    assert xg.grad.dtype == torch.float32 and torch.isfinite(xg.grad).all()


# -- op families ----------------------------------------------------------------------------------------
def test_op_families_are_named_records():
    from qtune.ops import OP_FAMILIES, OpFamily, register_op_family

    assert {"4bit", "int8", "llm_int8", "gptq", "llm_int8_bnb", "gguf"} <= set(OP_FAMILIES)  # + any a test registers
    assert OP_FAMILIES["gptq"].arg_names == ("qweight", "qzeros", "scales", "g_idx", "bits", "in_features")
    assert OP_FAMILIES["4bit"].arg_names[-2:] == ("blocksize", "shape")
    for key in ("nf4-dq", "int8-zp-g32", "llm_int8", "gptq3-act"):
        lay = make_layer(key, nn.Linear(64, 48))
        fam = OP_FAMILIES[lay.op_family]
        assert fam.shape(**fam.named(lay.weight_args())) == (48, 64)
    with pytest.raises(ValueError, match="already registered"):
        register_op_family(OP_FAMILIES["int8"])
    with pytest.raises(TypeError, match=r"dequantize does not take the schema's argument\(s\) \['scale'\]"):
        register_op_family(OpFamily("test_mismatch", "Tensor codes, Tensor scale",
                                    dequantize=lambda codes, dtype: codes.to(dtype), shape=lambda codes, scale: codes.shape))
    assert "test_mismatch" not in OP_FAMILIES
