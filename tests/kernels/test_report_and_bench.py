"""The static report and the kernel-benchmark alias (``qtune.bench.kernels``) on a CPU-only machine."""
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
                   "linear_int8[bwd]", "llm_int8[gemm]", "dequant_gguf", "linear_gguf[fwd_decode]", "dequant_affine",
                   "linear_affine[fwd]", "linear_affine[bwd_decode]"):
        assert kernel in out, kernel
    assert "sm_80" in out and "sm_90" in out and "wgmma" in out and "mma.sync" in out
    assert "0 failed" in out and "0 fused matmuls without tensor-core" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_bench_alias_without_cuda_exits_cleanly():
    # qtune.bench.kernels is `qtune.bench.gpu --stages bench` (tests/bench/test_gpu_bench.py covers the stages)
    proc = subprocess.run([sys.executable, "-m", "qtune.bench.kernels", "--quick"], env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("qtune.bench.gpu: no CUDA device is present")


def test_bench_alias_selects_the_bench_stage(monkeypatch):
    from qtune.bench import gpu, kernels

    seen = []
    monkeypatch.setattr(kernels, "gpu_main", lambda argv: seen.append(argv) or 0)
    assert kernels.main(["--quick"]) == 0 and kernels.main(["--stages", "correct"]) == 0
    assert seen == [["--stages", "bench", "--quick"], ["--stages", "correct"]]
    assert gpu._parse(seen[0]).stages == ["bench"]
