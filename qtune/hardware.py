"""What this machine computes fast: the ``dtype: auto`` choice and the facts behind it.

A bf16 matmul is only fast on a CPU with native bf16 dot products (x86 AVX512-BF16 or AMX-BF16, used
by PyTorch's oneDNN/ATen kernels when the dispatch capability is AVX512). Without them PyTorch
converts bf16 to fp32 element by element inside the matmul: measured on a 2-core AVX2 EPYC, a
576×1536 by 1024-token matmul took 51 ms in fp32 and 226 ms in bf16 (4.4× slower). So ``auto`` means

- CUDA: bf16 if ``torch.cuda.is_bf16_supported()`` (Ampere and later), fp32 otherwise;
- CPU: bf16 if :func:`native_bf16_cpu`, fp32 otherwise.

The CPU decision reads what torch reports, never a hard-coded machine: the ATen dispatch capability
(``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY=avx2``), the CPU
feature flags (``torch.cpu.get_capabilities()``: ``avx512_bf16``, ``amx_bf16``; ARM ``bf16``) and a
``ONEDNN_MAX_CPU_ISA`` cap if one is set. Where those do not settle it (a CPU family this module has no
rule for, e.g. ARM with bf16 instructions), a short timing probe (bf16 against fp32 matmul) decides;
its result is cached per machine in ``$QTUNE_CACHE_DIR`` (default ``~/.cache/qtune``) under a key of
CPU name, capability, oneDNN cap and torch version.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from .formats.base import parse_dtype

AUTO = "auto"

# ONEDNN_MAX_CPU_ISA values that exclude bf16 dot-product instructions (oneDNN's dnnl_cpu_isa names)
_ONEDNN_NO_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
# bf16 is "native" if the probe's bf16 matmul is at most this much slower than fp32 (on AVX512-BF16
# it is ~3× faster; without native support ~4× slower, so the threshold sits far from both)
_PROBE_MAX_SLOWDOWN = 1.25
_PROBE_SHAPE = (256, 1024, 1024)  # M, K, N: ~0.5 GFLOP, a few ms per matmul on one core


def cpu_name() -> str:
    """The CPU model name as torch's cpuinfo reports it (``platform.processor()`` as a fallback)."""
    name = torch.cpu.get_capabilities().get("cpu_name") if hasattr(torch.cpu, "get_capabilities") else None
    return str(name or platform.processor() or platform.machine() or "unknown CPU")


def cpu_capability() -> str:
    """ATen's CPU dispatch capability (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``, ``"SVE256"``...)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_flags() -> dict[str, object]:
    """CPU feature flags from ``torch.cpu.get_capabilities()`` (empty if this torch lacks it)."""
    if not hasattr(torch.cpu, "get_capabilities"):
        return {}
    return dict(torch.cpu.get_capabilities())


def cache_dir() -> Path:
    """Where per-machine probe results live: ``$QTUNE_CACHE_DIR`` or ``~/.cache/qtune``."""
    return Path(os.environ.get("QTUNE_CACHE_DIR") or Path.home() / ".cache" / "qtune")


def machine_key() -> str:
    """Key of a cached probe: CPU name, dispatch capability, oneDNN cap and torch version."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() or "-"
    return f"{cpu_name()}|{cpu_capability()}|onednn={isa}|torch={torch.__version__}"


def native_bf16_cpu() -> tuple[bool, str]:
    """Whether a bf16 matmul on this CPU runs on native bf16 instructions (and is thus fast).

    Returns:
        ``(native, reason)``: ``reason`` is one human-readable line naming what torch reported.
    """
    cap = cpu_capability()
    flags = cpu_flags()
    arch = str(flags.get("architecture") or platform.machine()).lower()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    x86 = arch in ("x86_64", "amd64", "x86", "i386", "i686")
    slow = "bf16 matmul is several times slower than fp32 here"
    if x86:
        if not cap.startswith("AVX512"):
            return False, f"CPU reports {cap} (no AVX512-BF16/AMX): {slow}"
        if isa in _ONEDNN_NO_BF16:
            return False, f"ONEDNN_MAX_CPU_ISA={isa} excludes bf16 instructions: {slow}"
        native = [n for n in ("amx_bf16", "avx512_bf16") if flags.get(n)]
        if native:
            return True, f"CPU reports {cap} with {'+'.join(f.upper().replace('_', '-') for f in native)}: native bf16 matmul"
        if flags:
            return False, f"CPU reports {cap} without AVX512-BF16/AMX-BF16: {slow}"
    return _probe_cached(f"CPU {cpu_name()} ({arch}, capability {cap}) has no rule here")


def _probe_cached(why: str) -> tuple[bool, str]:
    """Time bf16 against fp32 matmul once per machine key; read the cached verdict afterwards."""
    path = cache_dir() / "bf16_probe.json"
    key = machine_key()
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}  # an unreadable cache is re-measured and rewritten, never trusted
    entry = cache.get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("ratio"), (int, float))):
        entry = {"ratio": probe_bf16_slowdown(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        cache[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home only costs a re-probe next time; the verdict below is still measured
    ratio = float(entry["ratio"])
    native = ratio <= _PROBE_MAX_SLOWDOWN
    verdict = "native bf16 matmul" if native else "bf16 matmul is several times slower than fp32 here"
    return native, f"{why}; timing probe: bf16 matmul takes {ratio:.2f}× the fp32 time: {verdict}"


def probe_bf16_slowdown(shape: tuple[int, int, int] = _PROBE_SHAPE, repeat: int = 3) -> float:
    """Best-of-``repeat`` time of a bf16 matmul divided by that of the same fp32 matmul (one warm-up each).

    Args:
        shape: ``(M, K, N)`` of ``[M, K] @ [K, N]``.
    """
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    best = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = a32.to(dt), b32.to(dt)
        a @ b
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        best[dt] = min(times)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def auto_dtype(device: torch.device | str | None = None) -> tuple[torch.dtype, str]:
    """The compute/model dtype ``auto`` stands for on ``device`` (default: CUDA if available, else CPU).

    Returns:
        ``(dtype, reason)``: bf16 or fp32, and one line saying why.
    """
    dev = _device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(idx)
        cc = ".".join(map(str, torch.cuda.get_device_capability(idx)))
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"CUDA {name} (compute capability {cc}) supports bf16"
        return torch.float32, f"CUDA {name} (compute capability {cc}) has no bf16 support: fp32"
    if dev.type == "cpu":
        native, reason = native_bf16_cpu()
        return (torch.bfloat16 if native else torch.float32), reason
    return torch.float32, f"device type {dev.type!r} has no auto rule: fp32"


def resolve_dtype(value: str | torch.dtype | None, device: torch.device | str | None = None,
                  *, what: str = "dtype") -> tuple[torch.dtype | None, str | None]:
    """Resolve a recipe/config dtype: ``"auto"`` → :func:`auto_dtype`; explicit names/dtypes win.

    Returns:
        ``(dtype, reason)``: ``reason`` is None unless ``auto`` chose; ``(None, None)`` for None.

    Raises:
        ValueError / TypeError: ``value`` is not ``"auto"``, None, or a float dtype (name).
    """
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return auto_dtype(device)
    return parse_dtype(value, what=what), None
