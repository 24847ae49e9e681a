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

    # the op families qtune ships Triton kernels for (formats registered later, by qtune or by a test module,
    # may have none yet: on CUDA they run the reference, with the slow-path warning)
    with_kernels = {fmt for fmt in WEIGHT_SCHEMAS if f"linear_{fmt}" in K.OPS}
    assert with_kernels == {"4bit", "int8", "llm_int8", "gptq", "gguf", "affine"}, sorted(with_kernels)
    for fmt in sorted(with_kernels):
        schema = WEIGHT_SCHEMAS[fmt]
        names = [arg.split()[-1] for arg in schema.split(", ")]
        fwd = list(inspect.signature(getattr(K, f"linear_{fmt}")).parameters)
        bwd = list(inspect.signature(getattr(K, f"linear_{fmt}_grad_input")).parameters)
        assert fwd[1:1 + len(names)] == names and fwd[1 + len(names)] == "bias", (fmt, fwd)
        assert bwd[1:1 + len(names)] == names, (fmt, bwd)
        # what register() installs for the op: the routing wrapper, with exactly the op's arguments
        from qtune.kernels import routing

        fwd = list(inspect.signature(getattr(routing, f"linear_{fmt}")).parameters)
        bwd = list(inspect.signature(getattr(routing, f"linear_{fmt}_grad_input")).parameters)
        assert fwd == ["x", *names, "bias"] and bwd == ["grad_out", *names], (fmt, fwd, bwd)


# A CUDA machine whose Triton cannot build qtune's kernels: `cuda_available` is faked so that
# `import qtune` really tries to register, and the failure is injected where old Tritons fail.
FAILING_REGISTRATION = textwrap.dedent("""
    import os, sys, warnings
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.simplefilter("always")
    import torch
    torch.cuda.is_available = lambda: True    # what qtune.kernels.cuda_available asks
    MODE = sys.argv[1]
    if MODE == "import":                      # e.g. a kernel module using tl.gather on Triton 3.2
        sys.modules["qtune.kernels.matmul_gptq"] = None
    else:                                     # any other exception while registering
        import torch.library
        real = torch.library.register_kernel
        def boom(op, device_types, *a, **k):
            if device_types == "cuda":
                raise RuntimeError("register_kernel exploded")
            return real(op, device_types, *a, **k)
        torch.library.register_kernel = boom
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import qtune
    import qtune.kernels as K
    torch.cuda.is_available = lambda: False
    msgs = [str(w.message) for w in caught if "registering the Triton kernels failed" in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in caught]
    print("WARNING:", msgs[0])
    assert K.registered() == [], K.registered()
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("qtune::linear_4bit", "CUDA")
    from qtune.ops.library import slow_path_reason
    print("REASON:", slow_path_reason("cuda"))
    from qtune.formats import nf4
    from qtune.ops import LINEAR_OPS
    w = torch.randn(24, 64)
    t = nf4.quantize_4bit(w, nf4.NF4Config())
    x = torch.randn(3, 64)
    y = LINEAR_OPS["4bit"](x, t.packed, t.absmax, t.code, None, None, None, 64, [24, 64], None)
    W = nf4.dequantize_4bit(t.packed, t.absmax, t.code, 64, (24, 64))
    torch.testing.assert_close(y, x @ W.T)
    print("reference ok")
""")


@pytest.mark.parametrize("mode,cause", [("import", "matmul_gptq"), ("register", "register_kernel exploded")])
def test_failing_registration_never_breaks_import_and_warns_once(mode, cause):
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", FAILING_REGISTRATION, mode], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warning = next(line for line in proc.stdout.splitlines() if line.startswith("WARNING:"))
    assert cause in warning
    reason = next(line for line in proc.stdout.splitlines() if line.startswith("REASON:"))
    assert "registering qtune's Triton kernels failed" in reason and cause in reason and "Fix:" in reason
    assert "reference ok" in proc.stdout
