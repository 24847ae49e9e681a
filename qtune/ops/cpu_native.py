"""Native CPU kernels (``qtune/csrc/qtune_cpu.c``) registered as the ``cpu`` kernels of the qtune ops.

The C file is compiled on first use with the system C compiler (``cc -O3 -march=native -ffp-contract=off -fopenmp``,
about a second) into ``$QTUNE_CACHE`` (default ``~/.cache/qtune``) and loaded with ctypes; no
PyTorch headers are needed. The kernels reproduce the pure-PyTorch reference bit for bit (tested).

Where no C compiler is available, or ``QTUNE_NATIVE_CPU=0``, the reference kernels serve the CPU and
a warning says so once: results are identical, only slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..formats import gptq as gptq_fmt
from ..formats import int8 as int8_fmt
from ..formats import nf4
from .library import register_device_kernel

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "qtune_cpu.c"
# -ffp-contract=off: no fused multiply-adds, so every product and sum rounds as torch's reference does
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_failed: Optional[str] = None


def cache_dir() -> Path:
    return Path(os.environ.get("QTUNE_CACHE", Path.home() / ".cache" / "qtune"))


def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


def _build() -> ctypes.CDLL:
    src = _SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    lib_path = cache_dir() / f"libqtune_cpu_{tag}.so"
    if not lib_path.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            raise RuntimeError("no C compiler (cc/gcc/clang) found")
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            tmp_lib = Path(tmp) / lib_path.name
            cmd = [cc, *_FLAGS, str(_SOURCE), "-o", str(tmp_lib), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")
            os.replace(tmp_lib, lib_path)  # atomic: concurrent processes never load a half-written file
    lib = ctypes.CDLL(str(lib_path))
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.qt_dequant_4bit.argtypes = [ptr, ptr, ptr, ptr, ptr, ctypes.c_float, ptr, i64, i64, ptr, c_int, c_int]
    lib.qt_quant_4bit.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, c_int]
    lib.qt_dequant_int8.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ptr, c_int, c_int]
    lib.qt_quant_int8_rows.argtypes = [ptr, c_int, i64, i64, ptr, ptr, c_int]
    lib.qt_int8_mm_dequant.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, ptr, c_int, c_int]
    lib.qt_dequant_gptq.argtypes = [ptr, ptr, ptr, ptr, i64, i64, c_int, ptr, c_int, c_int]
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded native library, or ``None`` (after one warning) where it cannot be built."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            if os.environ.get("QTUNE_NATIVE_CPU", "1") == "0":
                _failed = "disabled by QTUNE_NATIVE_CPU=0"
            else:
                try:
                    _lib = _build()
                except (OSError, RuntimeError) as e:
                    _failed = str(e)
                    warnings.warn(f"qtune: native CPU kernels unavailable ({e}); using the pure-PyTorch "
                                  "reference kernels (same results, slower)", RuntimeWarning, stacklevel=2)
    return _lib


def build_state() -> dict[str, object]:
    """The native kernels' state for reports (``qtune env``): built or not, the library file, the reason.

    Builds (or loads the cached build of) the library if that has not happened in this process.
    """
    lib = library()
    return {"built": lib is not None, "library": None if lib is None else str(lib._name),
            "error": _failed, "flags": " ".join(_FLAGS), "source": str(_SOURCE)}


def _p(t: Tensor) -> int:
    return t.data_ptr()


def dequantize_4bit_cpu(packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                        nested_code: Optional[Tensor], nested_offset: Optional[Tensor], blocksize: int,
                        shape: list[int], dtype: torch.dtype) -> Tensor:
    lib = library()
    if lib is None or dtype not in _KIND:
        return nf4.dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, nested_absmax=nested_absmax,
                                   nested_code=nested_code, nested_offset=nested_offset)
    n = shape[0] * shape[1]
    nblocks = -(-n // blocksize)
    if packed.numel() * 2 < n or absmax.numel() != nblocks:
        return nf4.dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, nested_absmax=nested_absmax,
                                   nested_code=nested_code, nested_offset=nested_offset)  # raises its error
    packed, code = packed.contiguous(), code.float().contiguous()
    out = torch.empty(shape, dtype=dtype)
    if absmax.dtype == torch.uint8:  # double quant: the C kernel undoes it per block
        if nested_absmax is None or nested_code is None or nested_offset is None:
            nf4.dequantize_absmax(absmax, nested_absmax, nested_code, nested_offset)  # raises its error
        qabs, ncode, nabs = absmax.contiguous(), nested_code.float().contiguous(), nested_absmax.float().contiguous()
        if ncode.numel() != 256 or nabs.numel() != -(-nblocks // nf4.NESTED_BLOCKSIZE):
            raise ValueError(f"double-quantized absmax: nested_code has {ncode.numel()} entries (expected 256) and "
                             f"nested_absmax {nabs.numel()} (expected {-(-nblocks // nf4.NESTED_BLOCKSIZE)})")
        lib.qt_dequant_4bit(_p(packed), None, _p(qabs), _p(ncode), _p(nabs), float(nested_offset), _p(code), n,
                            blocksize, _p(out), _KIND[dtype], torch.get_num_threads())
    else:
        scale = absmax.float().contiguous()
        lib.qt_dequant_4bit(_p(packed), _p(scale), None, None, None, 0.0, _p(code), n, blocksize, _p(out),
                            _KIND[dtype], torch.get_num_threads())
    return out


def quantize_blocks_4bit_cpu(flat: Tensor, blocksize: int, code: Tensor) -> tuple[Tensor, Tensor]:
    """Packed bytes (uint8 [ceil(n/2)]) and fp32 absmax of fp32 ``flat`` (see ``nf4.quantize_blocks_4bit``)."""
    lib = library()
    if lib is None or flat.dtype != torch.float32:
        return nf4.quantize_blocks_4bit(flat, blocksize, code)
    order = torch.argsort(code)
    sorted_code = code[order]
    mids = ((sorted_code[:-1] + sorted_code[1:]) / 2).contiguous()
    order8 = order.to(torch.uint8).contiguous()
    flat = flat.contiguous()
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty((n + blocksize - 1) // blocksize, dtype=torch.float32)
    lib.qt_quant_4bit(_p(flat), n, blocksize, _p(mids), _p(order8), _p(packed), _p(absmax), torch.get_num_threads())
    return packed, absmax


def dequantize_int8_cpu(weight: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int,
                        dtype: torch.dtype) -> Tensor:
    lib = library()
    expected = torch.int8 if zero is None else torch.uint8
    if lib is None or weight.dtype != expected or dtype not in _KIND or weight.dim() != 2:
        return int8_fmt.dequantize_int8(weight, scale, zero, group_size, dtype)
    rows, cols = weight.shape
    g = cols if group_size == -1 else group_size
    ngroups = -(-cols // g)
    if tuple(scale.shape) != (rows, ngroups) or (zero is not None and tuple(zero.shape) != (rows, ngroups)):
        return int8_fmt.dequantize_int8(weight, scale, zero, group_size, dtype)  # raises its shape error
    weight, scale = weight.contiguous(), scale.float().contiguous()
    zero = zero.contiguous() if zero is not None else None
    out = torch.empty(rows, cols, dtype=dtype)
    lib.qt_dequant_int8(_p(weight), _p(scale), None if zero is None else _p(zero), rows, cols, g, ngroups,
                        _p(out), _KIND[dtype], torch.get_num_threads())
    return out


def quantize_int8_rows_cpu(weight: Tensor) -> tuple[Tensor, Tensor]:
    """int8 [N, K] codes and fp32 [N] absmax of a float [N, K] weight (see ``int8.quantize_int8_rows``)."""
    lib = library()
    if lib is None or weight.dtype not in _KIND or weight.dim() != 2:
        return int8_fmt.quantize_int8_rows(weight)
    weight = weight.detach().contiguous()
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    absmax = torch.empty(rows, dtype=torch.float32)
    lib.qt_quant_int8_rows(_p(weight), _KIND[weight.dtype], rows, cols, _p(q), _p(absmax), torch.get_num_threads())
    return q, absmax


def dequantize_gptq_cpu(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                        in_features: int, dtype: torch.dtype) -> Tensor:
    lib = library()
    if lib is None or dtype not in _KIND or qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        return gptq_fmt.dequantize_gptq(qweight, qzeros, scales, g_idx, bits, in_features, dtype)
    gptq_fmt.check_gptq_tensors(qweight, qzeros, scales, g_idx, bits, in_features)
    out_features = scales.shape[1]
    z = gptq_fmt.unpack_zeros(qzeros, bits, out_features).contiguous()
    qweight, s = qweight.contiguous(), scales.float().contiguous()
    g = g_idx.to(torch.int32).contiguous()
    out = torch.empty(out_features, in_features, dtype=dtype)
    lib.qt_dequant_gptq(_p(qweight), _p(z), _p(s), _p(g), in_features, out_features, bits, _p(out), _KIND[dtype],
                        torch.get_num_threads())
    return out


def int8_mm_dequant_cpu(acc: Tensor, sx: Tensor, scb: Tensor, bias: Optional[Tensor], dtype: torch.dtype,
                        scale: float = 1.0 / (127.0 * 127.0)) -> Tensor:
    lib = library()
    m, n = acc.shape if acc.dim() == 2 else (0, 0)
    if (lib is None or dtype not in _KIND or acc.dtype != torch.int32 or acc.dim() != 2 or sx.numel() != m
            or scb.numel() != n or (bias is not None and bias.numel() != n)):
        return int8_fmt.int8_mm_dequant(acc, sx, scb, bias, dtype, scale)
    acc, sx, scb = acc.contiguous(), sx.float().contiguous(), scb.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    out = torch.empty(m, n, dtype=dtype)
    lib.qt_int8_mm_dequant(_p(acc), _p(sx), _p(scb), None if bias is None else _p(bias), m, n, scale, _p(out),
                           _KIND[dtype], torch.get_num_threads())
    return out


def register() -> None:
    register_device_kernel("dequantize_4bit", "cpu", dequantize_4bit_cpu)
    register_device_kernel("dequantize_int8", "cpu", dequantize_int8_cpu)
    register_device_kernel("quantize_blocks_4bit", "cpu", quantize_blocks_4bit_cpu)
    register_device_kernel("quantize_int8_rows", "cpu", quantize_int8_rows_cpu)
    register_device_kernel("dequantize_gptq", "cpu", dequantize_gptq_cpu)
    register_device_kernel("int8_mm_dequant", "cpu", int8_mm_dequant_cpu)
