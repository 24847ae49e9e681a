"""``dtype: auto``: bf16 only where the CPU/GPU computes it natively, fp32 otherwise; explicit dtypes win."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qtune import hardware

AVX512_BF16 = {"architecture": "x86_64", "cpu_name": "Test CPU", "avx2": True, "avx512_f": True,
               "avx512_bf16": True, "amx_bf16": False}


@pytest.fixture
def fake_cpu(monkeypatch):
    """Pretend to be a CPU with the given ATen capability and feature flags (and no ONEDNN cap)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def set_cpu(capability: str, flags: dict):
        monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
        monkeypatch.setattr(hardware, "cpu_flags", lambda: dict(flags))
        monkeypatch.setattr(hardware, "cpu_name", lambda: str(flags.get("cpu_name", "Test CPU")))
    return set_cpu


def test_forced_avx2_subprocess_picks_fp32_with_reason():
    """A real process with the capability forced to AVX2 (what an AVX2-only EPYC reports)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    code = ("import json, torch; from qtune.hardware import auto_dtype, resolve_dtype\n"
            "d, r = auto_dtype('cpu'); e, s = resolve_dtype('auto', 'cpu')\n"
            "print(json.dumps([str(d), r, str(e), s, torch.backends.cpu.get_cpu_capability()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    dtype, reason, dtype2, reason2, cap = json.loads(out.stdout.strip().splitlines()[-1])
    assert cap == "AVX2"
    assert dtype == dtype2 == "torch.float32"
    assert reason == reason2
    assert reason.startswith("CPU reports AVX2 (no AVX512-BF16/AMX)") and "slower than fp32" in reason


def test_avx2_capability_gives_fp32(fake_cpu):
    fake_cpu("AVX2", {**AVX512_BF16})  # flags say bf16, but ATen dispatches AVX2 kernels
    assert hardware.native_bf16_cpu()[0] is False
    dtype, reason = hardware.auto_dtype("cpu")
    assert dtype == torch.float32 and "AVX2" in reason


def test_native_bf16_gives_bf16(fake_cpu):
    fake_cpu("AVX512", AVX512_BF16)
    dtype, reason = hardware.auto_dtype("cpu")
    assert dtype == torch.bfloat16 and "AVX512-BF16" in reason
    fake_cpu("AVX512", {**AVX512_BF16, "avx512_bf16": False, "amx_bf16": True})
    assert hardware.auto_dtype("cpu") == (torch.bfloat16, "CPU reports AVX512 with AMX-BF16: native bf16 matmul")


def test_avx512_without_bf16_or_onednn_cap_gives_fp32(fake_cpu, monkeypatch):
    fake_cpu("AVX512", {**AVX512_BF16, "avx512_bf16": False})
    assert hardware.auto_dtype("cpu")[0] == torch.float32
    fake_cpu("AVX512", AVX512_BF16)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    dtype, reason = hardware.auto_dtype("cpu")
    assert dtype == torch.float32 and "ONEDNN_MAX_CPU_ISA=AVX2" in reason


def test_explicit_dtypes_win(fake_cpu):
    fake_cpu("AVX2", {})
    assert hardware.resolve_dtype("bfloat16") == (torch.bfloat16, None)
    assert hardware.resolve_dtype(torch.float16) == (torch.float16, None)
    assert hardware.resolve_dtype("fp32") == (torch.float32, None)
    assert hardware.resolve_dtype(None) == (None, None)
    assert hardware.resolve_dtype("AUTO")[0] == torch.float32
    with pytest.raises(ValueError, match="dtype='bf17'"):
        hardware.resolve_dtype("bf17")
    with pytest.raises(TypeError, match="floating dtype"):
        hardware.resolve_dtype(torch.int8)


@pytest.mark.parametrize("ratio, native", [(0.4, True), (4.4, False)])
def test_probe_decides_unknown_cpu_and_is_cached(fake_cpu, monkeypatch, tmp_path, ratio, native):
    """A CPU family without a rule (here ARM) is timed once; later calls read the cache."""
    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path))
    fake_cpu("SVE256", {"architecture": "aarch64", "cpu_name": "Test ARM", "bf16": True})
    calls = []
    monkeypatch.setattr(hardware, "probe_bf16_slowdown", lambda *a, **k: calls.append(1) or ratio)
    first = hardware.auto_dtype("cpu")
    second = hardware.auto_dtype("cpu")
    assert len(calls) == 1, "the second call must read the cached probe, not time again"
    assert first == second
    assert first[0] == (torch.bfloat16 if native else torch.float32)
    assert f"{ratio:.2f}×" in first[1]
    cache = json.loads((tmp_path / "bf16_probe.json").read_text())
    assert cache[hardware.machine_key()]["ratio"] == ratio
    # a different machine key (another torch version, CPU, or capability) is probed afresh
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "SVE512")
    hardware.auto_dtype("cpu")
    assert len(calls) == 2


def test_probe_measures_a_ratio():
    ratio = hardware.probe_bf16_slowdown(shape=(32, 64, 64), repeat=1)
    assert ratio > 0 and ratio == ratio  # finite positive time ratio


@pytest.mark.parametrize("native, model_dtype, expected", [
    (False, torch.bfloat16, torch.float32), (True, torch.bfloat16, torch.bfloat16),
    (True, torch.float32, torch.float32), (False, torch.float32, torch.float32),
    (True, torch.float16, torch.float32)])
def test_quantized_layers_built_with_auto_compute_dtype(fake_cpu, native, model_dtype, expected):
    """``QTuneConfig`` defaults to ``compute_dtype="auto"``: next to the model's dtype it keeps that dtype
    unless it is slow here (bf16 without native bf16, fp16 on a CPU), never going below the model's."""
    from torch import nn

    from qtune.formats import NF4Config
    from qtune.integrations.transformers import QTuneConfig, meta_layer

    fake_cpu("AVX512", {**AVX512_BF16, "avx512_bf16": native})
    assert QTuneConfig("nf4").compute_dtype == "auto"
    cfg = QTuneConfig("nf4").default_config()
    assert cfg.compute_dtype == "auto"
    layer = meta_layer(nn.Linear(64, 32, dtype=model_dtype, device="meta"), cfg, model_dtype=model_dtype)
    assert layer.compute_dtype == expected
    explicit = meta_layer(nn.Linear(64, 32, dtype=model_dtype, device="meta"), NF4Config(compute_dtype="bfloat16"),
                          model_dtype=model_dtype)
    assert explicit.compute_dtype == torch.bfloat16  # explicit dtypes win


def test_format_config_accepts_auto(fake_cpu):
    from qtune.formats import LLMInt8Config, NF4Config

    fake_cpu("AVX2", {})
    assert NF4Config(compute_dtype="auto").torch_compute_dtype == torch.float32
    fake_cpu("AVX512", AVX512_BF16)
    assert LLMInt8Config(compute_dtype="auto").resolve_compute_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="compute_dtype='automatic'"):
        NF4Config(compute_dtype="automatic")
