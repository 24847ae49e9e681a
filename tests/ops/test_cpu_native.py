"""The native CPU kernels equal the pure-PyTorch reference bit for bit; without a compiler, the reference serves."""
import os
import subprocess
import sys

import pytest
import torch

import qtune  # noqa: F401
from qtune.formats import int8, nf4
from qtune.ops import cpu_native

pytestmark = pytest.mark.skipif(cpu_native.library() is None, reason="no C compiler: native CPU kernels not built")

SHAPES = [((256, 512), 64), ((33, 77), 64), ((96, 576), 128), ((300, 1000), 4096), ((3, 3), 32), ((1, 1), 64)]


@pytest.mark.parametrize("shape,blocksize", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_blocks_4bit_bit_exact(shape, blocksize, quant_type):
    flat = torch.randn(shape).reshape(-1)
    flat[::7] = 0.0
    code = nf4.code_table(quant_type)
    ref = nf4.quantize_blocks_4bit(flat, blocksize, code)
    out = cpu_native.quantize_blocks_4bit_cpu(flat, blocksize, code)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])


@pytest.mark.parametrize("shape,blocksize", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_4bit_bit_exact(shape, blocksize, dtype, double_quant):
    t = nf4.quantize_4bit(torch.randn(shape), nf4.NF4Config(blocksize=blocksize, double_quant=double_quant))
    args = (t.packed, t.absmax, t.code, t.nested_absmax, t.nested_code, t.nested_offset, blocksize, list(shape), dtype)
    ref = nf4.dequantize_4bit(t.packed, t.absmax, t.code, blocksize, shape, dtype, nested_absmax=t.nested_absmax,
                              nested_code=t.nested_code, nested_offset=t.nested_offset)
    assert torch.equal(cpu_native.dequantize_4bit_cpu(*args), ref)
    assert torch.equal(torch.ops.qtune.dequantize_4bit(*args), ref)  # the op dispatches to it on CPU


@pytest.mark.parametrize("group_size", [-1, 32, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_int8_bit_exact(group_size, dtype):
    t = int8.quantize_int8(torch.randn(40, 100), int8.Int8Config(group_size=group_size))
    ref = int8.dequantize_int8(t.weight, t.scale, None, group_size, dtype)
    assert torch.equal(cpu_native.dequantize_int8_cpu(t.weight, t.scale, None, group_size, dtype), ref)


def test_without_compiler_the_reference_serves(tmp_path):
    code = ("import warnings, torch, qtune\n"
            "from qtune.ops import cpu_native\n"
            "w = torch.randn(64, 96)\n"
            "with warnings.catch_warnings(record=True) as rec:\n"
            "    warnings.simplefilter('always')\n"
            "    lay = qtune.Linear4bit.from_float(torch.nn.Linear(96, 64), qtune.NF4Config())\n"
            "    y = lay(torch.randn(3, 96))\n"
            "assert cpu_native.library() is None\n"
            "assert any('native CPU kernels unavailable' in str(r.message) for r in rec), [str(r.message) for r in rec]\n"
            "print('ok')\n")
    env = {**os.environ, "QTUNE_CACHE": str(tmp_path), "CC": "/bin/false"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
