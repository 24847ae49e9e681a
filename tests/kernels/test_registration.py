"""Registration: without Triton or CUDA nothing is registered and the ops keep their reference results;
with Triton, every CUDA kernel wrapper takes its op's arguments."""
import subprocess
import sys
import textwrap

import pytest
import torch

from qtune.kernels import OPS

NO_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None            # `import triton` raises ImportError
    import torch
    import qtune                            # imports qtune.kernels and calls register()
    import qtune.kernels as K
    from qtune.formats import gptq, int8, nf4
    from qtune.ops import GRAD_INPUT_OPS, LINEAR_OPS
    assert not K.triton_available()
    assert K.register() == [] and K.registered() == []
    try:
        K.linear_4bit
    except AttributeError:
        pass
    else:
        raise AssertionError("kernel wrappers must not load without triton")
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    x = torch.randn(3, 64)
    t = nf4.quantize_4bit(w, nf4.NF4Config(double_quant=True, blocksize=32))
    args = (t.packed, t.absmax, t.code, t.nested_absmax, t.nested_code, t.nested_offset, 32, [24, 64])
    W = nf4.dequantize_4bit(t.packed, t.absmax, t.code, 32, (24, 64), nested_absmax=t.nested_absmax,
                            nested_code=t.nested_code, nested_offset=t.nested_offset)
    torch.testing.assert_close(LINEAR_OPS["4bit"](x, *args, None), x @ W.T)
    torch.testing.assert_close(GRAD_INPUT_OPS["4bit"](x[:, :24], *args), x[:, :24] @ W)
    g = gptq.quantize_rtn(w, gptq.RTNConfig(bits=3, group_size=32))
    gargs = (g.qweight, g.qzeros, g.scales, g.g_idx, 3, 64)
    torch.testing.assert_close(LINEAR_OPS["gptq"](x, *gargs, None), x @ g.dequantize().T)
    q = int8.quantize_int8(w, int8.LLMInt8Config())
    torch.testing.assert_close(LINEAR_OPS["llm_int8"](x, q.weight, q.scale[:, 0], 6.0, None),
                               int8.llm_int8_linear(x, q.weight, q.scale[:, 0], 6.0))
    print("fallback ok")
""")


def test_without_triton_nothing_is_registered_and_ops_use_the_reference():
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fallback ok" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_nothing_is_registered():
    import qtune.kernels as K

    assert K.register() == [] and K.registered() == []


def test_forced_registration_covers_every_op():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch, qtune, qtune.kernels as K
        names = K.register(force=True)
        assert sorted(names) == sorted(K.OPS), names
        for name in names:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qtune::{name}", "CUDA"), name
        print("registered", len(names))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"registered {len(OPS)}" in proc.stdout


def test_wrappers_take_the_op_schemas():
    pytest.importorskip("triton")
    import inspect

    import qtune.kernels as K
    from qtune.ops.linear import WEIGHT_SCHEMAS

    for fmt, schema in WEIGHT_SCHEMAS.items():
        names = [arg.split()[-1] for arg in schema.split(", ")]
        fwd = list(inspect.signature(getattr(K, f"linear_{fmt}")).parameters)
        bwd = list(inspect.signature(getattr(K, f"linear_{fmt}_grad_input")).parameters)
        assert fwd[1:1 + len(names)] == names and fwd[1 + len(names)] == "bias", (fmt, fwd)
        assert bwd[1:1 + len(names)] == names, (fmt, bwd)
