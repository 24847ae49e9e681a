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
its result is cached per machine in ``$QTUNE_CACHE`` (default ``~/.cache/qtune``) under a key of
CPU name, capability, oneDNN cap and torch version.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

from .dtypes import parse_dtype

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
    """Where per-machine probe results live: ``$QTUNE_CACHE`` or ``~/.cache/qtune``."""
    return Path(os.environ.get("QTUNE_CACHE") or Path.home() / ".cache" / "qtune")


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


def _cached_probe(name: str, measure) -> dict:
    """The cached result of probe ``name`` for this machine key, measuring (and caching) it first if absent.

    Results live in ``cache_dir()/<name>_probe.json`` as ``{machine_key: result}``.
    """
    path = cache_dir() / f"{name}_probe.json"
    key = machine_key()
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}  # an unreadable cache is re-measured and rewritten, never trusted
    entry = cache.get(key)
    if not isinstance(entry, dict):
        entry = {**measure(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        cache[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home only costs a re-probe next time; the verdict is still measured
    return entry


def _probe_cached(why: str) -> tuple[bool, str]:
    """Time bf16 against fp32 matmul once per machine key; read the cached verdict afterwards."""
    ratio = float(_cached_probe("bf16", lambda: {"ratio": probe_bf16_slowdown()})["ratio"])
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


INT8_METHODS = ("int_mm", "fp32")
# ONEDNN_MAX_CPU_ISA values without VNNI int8 dot products (torch._int_mm's oneDNN path then saturates
# int16 partial sums: measured wrong results under ONEDNN_MAX_CPU_ISA=AVX2 on an AVX512-VNNI CPU)
_ONEDNN_NO_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}
_INT8_VNNI_FLAGS = ("avx512_vnni", "amx_int8", "avx_vnni")


def int8_matmul_method(device: torch.device | str | None = None) -> tuple[str, str]:
    """Which exact int8×int8→int32 matmul is fast here: ``"int_mm"`` (``torch._int_mm``) or ``"fp32"``
    (fp32 matmuls over K-chunks of 1024, exact; see :func:`int8_matmul_fp32_chunks`).

    ``QTUNE_INT8_MATMUL=int_mm|fp32`` forces one. CUDA: ``int_mm``. x86 CPUs without VNNI int8
    instructions (or with oneDNN capped below them): ``fp32``, because ``torch._int_mm`` then runs a
    scalar loop (measured 8.0 s against 0.36 s for fp32, 1024×4096×4096 on an AVX2 EPYC). Otherwise a
    probe, cached per machine (:func:`probe_int8_matmul`), checks that ``torch._int_mm`` is exact on
    extreme values and faster than the fp32 path.

    Returns:
        ``(method, reason)``.
    """
    forced = os.environ.get("QTUNE_INT8_MATMUL", "").strip().lower()
    if forced:
        if forced not in INT8_METHODS:
            raise ValueError(f"QTUNE_INT8_MATMUL={forced!r} is not one of {INT8_METHODS}")
        return forced, f"forced by QTUNE_INT8_MATMUL={forced}"
    dev = _device(device)
    if dev.type == "cuda":
        return "int_mm", "CUDA: torch._int_mm (int8 tensor cores)"
    if dev.type != "cpu":
        return "fp32", f"device type {dev.type!r}: exact fp32 K-chunks"
    return _cpu_int8_method(machine_key())


@functools.lru_cache(maxsize=None)
def _cpu_int8_method(key: str) -> tuple[str, str]:
    flags = cpu_flags()
    arch = str(flags.get("architecture") or platform.machine()).lower()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    fp32 = "exact fp32 matmul over K-chunks of 1024"
    if arch in ("x86_64", "amd64", "x86", "i386", "i686"):
        if flags and not any(flags.get(f) for f in _INT8_VNNI_FLAGS):
            return "fp32", f"CPU has no AVX512-VNNI/AVX-VNNI/AMX-INT8 (torch._int_mm is a scalar loop here): {fp32}"
        if isa in _ONEDNN_NO_VNNI:
            return "fp32", f"ONEDNN_MAX_CPU_ISA={isa} excludes VNNI int8 kernels: {fp32}"
    r = _cached_probe("int8_matmul", probe_int8_matmul)
    if not r["int_mm_exact"]:
        return "fp32", f"timing probe: torch._int_mm is not exact on this machine: {fp32}"
    if r["int_mm_s"] < r["fp32_s"]:
        return "int_mm", f"timing probe: torch._int_mm {r['fp32_s'] / r['int_mm_s']:.1f}× faster than exact fp32 K-chunks"
    return "fp32", f"timing probe: torch._int_mm {r['int_mm_s'] / r['fp32_s']:.1f}× slower than the {fp32}"


def probe_int8_matmul(shape: tuple[int, int, int] = (256, 2048, 1024), repeat: int = 3) -> dict:
    """Exactness of ``torch._int_mm`` on extreme int8 values and best-of-``repeat`` times of both paths.

    Returns:
        ``{"int_mm_exact": bool, "int_mm_s": float, "fp32_s": float}``.
    """
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    a[:8], b[:8] = -128, -128  # sums of 128² products: overflow any int16 (saturating) accumulation
    a[8:16], b[8:16] = 127, -128
    best = {}
    for name, fn in (("int_mm", lambda: torch._int_mm(a, b.t())), ("fp32", lambda: int8_matmul_fp32_chunks(a, b))):
        out = fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        best[name] = (min(times), out)
    exact = torch.equal(best["int_mm"][1], best["fp32"][1])
    return {"int_mm_exact": bool(exact), "int_mm_s": best["int_mm"][0], "fp32_s": best["fp32"][0]}


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


def auto_compute_dtype(model_dtype: torch.dtype | None, device: torch.device | str | None = None
                       ) -> tuple[torch.dtype, str]:
    """``compute_dtype: auto`` next to a known model dtype: never less precise than the model, never slow.

    fp32/fp64 models compute in their dtype; a bf16 model in bf16 where that is native (:func:`auto_dtype`
    says bf16), else fp32; an fp16 model in fp16 on CUDA, in fp32 on CPUs (no fast fp16 matmul there).
    ``model_dtype`` None: :func:`auto_dtype`.

    Returns:
        ``(dtype, reason)``.
    """
    if model_dtype is None:
        return auto_dtype(device)
    if model_dtype in (torch.float32, torch.float64):
        return model_dtype, f"the model is {str(model_dtype).removeprefix('torch.')}"
    dev = _device(device)
    if model_dtype == torch.float16:
        if dev.type == "cuda":
            return torch.float16, "the model is float16 on CUDA"
        return torch.float32, f"the model is float16, which {dev.type} has no fast matmul for: fp32"
    if model_dtype == torch.bfloat16:
        dtype, reason = auto_dtype(device)
        return (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32), reason
    raise TypeError(f"auto_compute_dtype: model dtype {model_dtype} is not a float dtype")


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


# Largest K-chunk whose fp32 int8 dot products are exact: 1024 · 128² = 2²⁴ (fp32 holds every integer ≤ 2²⁴)
FP32_EXACT_CHUNK = 1024


def int8_matmul_fp32_chunks(a: torch.Tensor, b: torch.Tensor, chunk: int = FP32_EXACT_CHUNK) -> torch.Tensor:
    """``a @ bᵀ`` of int8 a [M, K], b [N, K] through fp32 matmuls that are provably exact.

    fp32 holds every integer of magnitude ≤ 2²⁴, and every product ``a[m,k]·b[n,k]`` is an integer, so a
    matmul is exact when all its partial sums (in whatever order a BLAS kernel takes them, FMA or not)
    stay within ±2²⁴. Two sufficient conditions, tried in this order:

    1. Cauchy–Schwarz: any partial sum is at most ``‖a_m‖₂‖b_n‖₂``; if ``max_m ‖a_m‖ · max_n ‖b_n‖ ≤ 2²⁴``
       (the fp32 norms inflated by their worst-case summation error ``(K+2)·2⁻²³``) one fp32 matmul over
       all of K is exact. Typical LLM.int8 operands pass (absmax-scaled Gaussian rows: ‖·‖ ≈ 2,000 at
       K = 4096); two norm passes cost ~2% of the matmul.
    2. Otherwise K is split into chunks of at most ``chunk`` ≤ 1024 columns: each product has magnitude
       ≤ 128² = 2¹⁴, so a chunk's partial sums stay within 1024·2¹⁴ = 2²⁴; each chunk's exact fp32 result
       is converted to int32 and the chunks are summed in int32.

    Either way the result equals ``torch._int_mm`` bit for bit (both wrap alike only past 2³¹).

    Returns:
        int32 [M, N].
    """
    if not 1 <= chunk <= FP32_EXACT_CHUNK:
        raise ValueError(f"int8_matmul_fp32_chunks: chunk={chunk} must be in [1, {FP32_EXACT_CHUNK}] to stay exact")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul_fp32_chunks: expected int8 operands, got {a.dtype} and {b.dtype}")
    af, bf = a.float(), b.float()
    bt = bf.t()  # [K, N]: a transposed view, which BLAS reads without a copy
    k = a.shape[1]
    if k > chunk and a.shape[0] and b.shape[0]:
        slack = 1.0 + (k + 2) * 2.0 ** -23
        bound = float(torch.linalg.vector_norm(af, dim=1).max()) * float(torch.linalg.vector_norm(bf, dim=1).max())
        if bound * slack * slack <= 2.0 ** 24:
            return torch.mm(af, bt).to(torch.int32)
    part = torch.mm(af[:, :chunk], bt[:chunk])
    acc = part.to(torch.int32)
    if k > chunk:
        # one fp32 and one int32 scratch for all chunks: fresh [M, N] tensors per chunk cost ~10% more
        ipart = torch.empty_like(acc)
        for s in range(chunk, k, chunk):
            torch.mm(af[:, s:s + chunk], bt[s:s + chunk], out=part)
            acc += ipart.copy_(part)
    return acc
