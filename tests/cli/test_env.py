"""``qtune env``: the bug-report facts, as text and as JSON, following what torch reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from qtune.cli.main import main


def test_env_json_reports_machine_and_versions(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu"]["auto_dtype"] in ("bfloat16", "float32") and info["cpu"]["auto_dtype_reason"]
    assert info["cpu"]["native_bf16"] == (info["cpu"]["auto_dtype"] == "bfloat16")
    assert info["cpu"]["int8_matmul"] in ("int_mm", "fp32")
    assert info["threads"]["torch"] == torch.get_num_threads()
    assert info["versions"]["torch"] == torch.__version__
    for pkg in ("transformers", "peft", "trl", "accelerate", "bitsandbytes", "gguf"):
        assert pkg in info["versions"]
    assert info["cuda"]["available"] == torch.cuda.is_available()
    assert isinstance(info["triton"]["kernels_registered"], list)
    assert info["native_cpu_kernels"]["built"] in (True, False)


def test_env_text_under_forced_avx2_says_fp32_and_why():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-m", "qtune", "env"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "capability AVX2" in text
    assert "native bf16   no: CPU reports AVX2 (no AVX512-BF16/AMX)" in text
    assert "dtype auto    float32" in text
    assert "int8 matmul   fp32: ONEDNN_MAX_CPU_ISA=AVX2" in text
    assert "ATEN_CPU_CAPABILITY=avx2" in text
    assert f"torch {torch.__version__}" in text
