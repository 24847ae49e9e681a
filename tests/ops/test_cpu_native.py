"""The native CPU kernels equal the pure-PyTorch reference bit for bit; without a compiler, the reference serves."""
import os
import subprocess
import sys

import pytest
import torch

import qtune  # noqa: F401
from qtune.formats import gptq, int8, nf4
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


@pytest.mark.parametrize("group_size", [-1, 32, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_int8_zero_point_bit_exact(group_size, dtype):
    t = int8.quantize_int8(torch.randn(40, 100) + 0.3, int8.Int8Config(symmetric=False, group_size=group_size))
    ref = int8.dequantize_int8(t.weight, t.scale, t.zero, group_size, dtype)
    assert torch.equal(cpu_native.dequantize_int8_cpu(t.weight, t.scale, t.zero, group_size, dtype), ref)
    assert torch.equal(torch.ops.qtune.dequantize_int8(t.weight, t.scale, t.zero, group_size, dtype), ref)


@pytest.mark.parametrize("shape", [(40, 100), (1, 1), (7, 4096), (129, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_int8_rows_bit_exact(shape, dtype):
    w = (torch.randn(shape) * 3).to(dtype)
    w[0] = 0.0  # an all-zero row: absmax 0, codes 0
    # exact .5 ties after scaling: round half to even, as torch.round
    if shape[1] >= 4:
        w[-1, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5]).to(dtype)
    q_ref, a_ref = int8.quantize_int8_rows(w)
    q, a = cpu_native.quantize_int8_rows_cpu(w)
    assert torch.equal(q, q_ref) and torch.equal(a, a_ref)
    q_op, a_op = torch.ops.qtune.quantize_int8_rows(w)
    assert torch.equal(q_op, q_ref) and torch.equal(a_op, a_ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group_size", [((48, 256), 128), ((37, 100), -1), ((70, 64), 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_gptq_bit_exact(bits, shape, group_size, dtype):
    n, k = shape
    t = gptq.quantize_rtn(torch.randn(shape), gptq.RTNConfig(bits=bits, group_size=group_size, sym=False))
    g_idx = t.g_idx[torch.randperm(k)].contiguous()  # act-order style: groups out of column order
    args = (t.qweight, t.qzeros, t.scales, g_idx, bits, k, dtype)
    ref = gptq.dequantize_gptq(*args)
    assert torch.equal(cpu_native.dequantize_gptq_cpu(*args), ref)
    assert torch.equal(torch.ops.qtune.dequantize_gptq(*args), ref)


def test_dequantize_gptq_native_rejects_mismatched_tensors():
    t = gptq.quantize_rtn(torch.randn(48, 256), gptq.RTNConfig(bits=4, group_size=128))
    with pytest.raises(ValueError, match="g_idx values must lie"):
        cpu_native.dequantize_gptq_cpu(t.qweight, t.qzeros, t.scales, t.g_idx + 5, 4, 256, torch.float32)
    with pytest.raises(ValueError, match="qzeros shape"):
        cpu_native.dequantize_gptq_cpu(t.qweight, t.qzeros[:, :1], t.scales, t.g_idx, 4, 256, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_mm_dequant_bit_exact(dtype, with_bias):
    acc = torch.randint(-2**20, 2**20, (33, 70), dtype=torch.int32)
    sx, scb = torch.rand(33) * 5, torch.rand(70) * 2
    bias = torch.randn(70) if with_bias else None
    ref = int8.int8_mm_dequant(acc, sx, scb, bias, dtype)
    assert torch.equal(cpu_native.int8_mm_dequant_cpu(acc, sx, scb, bias, dtype), ref)
    assert torch.equal(torch.ops.qtune.int8_mm_dequant(acc, sx, scb, bias, dtype), ref)


def test_llm_int8_linear_native_epilogue_matches_reference():
    x = torch.randn(40, 96, dtype=torch.bfloat16)
    x[:, 5] *= 20  # an outlier column
    q, a = int8.quantize_int8_rows(torch.randn(64, 96))
    ref = int8.llm_int8_linear(x, q, a, 6.0)
    out = int8.llm_int8_linear(x, q, a, 6.0, mm_dequant=torch.ops.qtune.int8_mm_dequant)
    assert torch.equal(out, ref)


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
