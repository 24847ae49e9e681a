"""The static report and the GPU benchmark run on a CPU-only machine."""
import os
import subprocess
import sys

import pytest
import torch


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_report_fast():
    pytest.importorskip("triton")
    # run from under the interpreter on purpose: the report re-runs itself without it
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "qtune.kernels.report", "--fast", "--check"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for column in ("regs", "spill", "smem", "tensor core", "B/weight"):
        assert column in out
    for kernel in ("dequant_4bit", "dequant_int8", "dequant_gptq", "linear_4bit[fwd]", "linear_gptq[fwd_decode]",
                   "linear_int8[bwd]", "llm_int8[gemm]"):
        assert kernel in out, kernel
    assert "sm_80" in out and "sm_90" in out and "wgmma" in out and "mma.sync" in out
    assert "0 failed" in out and "0 fused matmuls without tensor-core" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_bench_without_cuda_exits_cleanly():
    proc = subprocess.run([sys.executable, "-m", "qtune.bench.kernels"], env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device is present" in proc.stdout


def test_bench_code_paths_under_interpreter(capsys):
    # the benchmark's sections on tiny CPU weights with a dummy timer: catches API drift without a GPU
    pytest.importorskip("triton")
    from qtune.bench.kernels import Bench

    def once(fn):
        fn()
        return 1.0

    bench = Bench(torch.float16, 10, device="cpu", timer=once)
    bench.dequantize([(64, 128)])
    bench.forward([(64, 128)], (1, 20))
    bench.forward_backward([(64, 128)], (20,))
    out = capsys.readouterr().out
    for name in ("dequantize_nf4", "dequantize_gptq", "linear_nf4", "linear_gptq", "linear_llm_int8", "vs dense"):
        assert name in out
