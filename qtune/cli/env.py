"""``qtune env [--json]``: the machine and software facts to paste into a bug report.

CPU model, ATen dispatch capability and the bf16/int8 flags torch reports; whether bf16 matmul is native
and what ``dtype: auto`` picks (with its reason); the int8 matmul path; threads; CUDA devices and their
compute capability; Triton's version and the qtune kernels registered; the native C kernels' build
state; versions of torch, transformers, peft, trl, accelerate, bitsandbytes, gguf and qtune.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

PACKAGES = ("qtune", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "gguf", "triton",
            "safetensors", "huggingface_hub")
# CPU flags that decide qtune's speed paths (bf16 matmul, int8 matmul)
CPU_FLAGS = ("avx2", "avx512_f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile",
             "neon", "bf16", "i8mm", "sve")
ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "QTUNE_NATIVE_CPU", "QTUNE_INT8_MATMUL",
            "QTUNE_CACHE", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="print the machine and library facts for a bug report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_main)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    """Everything ``qtune env`` reports, as a JSON-serializable dict."""
    import torch

    from .. import hardware
    from ..ops import cpu_native

    flags = hardware.cpu_flags()
    native, bf16_reason = hardware.native_bf16_cpu()
    cpu_auto, cpu_auto_reason = hardware.auto_dtype("cpu")
    int8_method, int8_reason = hardware.int8_matmul_method("cpu")
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1)})
    auto, auto_reason = hardware.auto_dtype()
    try:
        from .. import kernels
        kernels_registered = kernels.registered()
        kernels_error = None
    except ImportError as e:  # qtune.kernels missing from this install
        kernels_registered, kernels_error = [], f"qtune.kernels not importable: {e}"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {"name": hardware.cpu_name(), "architecture": flags.get("architecture", platform.machine()),
                "capability": hardware.cpu_capability(),
                "flags": {f: bool(flags[f]) for f in CPU_FLAGS if f in flags},
                "cores": {"logical": flags.get("num_logical_cores", os.cpu_count()),
                          "physical": flags.get("num_physical_cores")},
                "native_bf16": native, "native_bf16_reason": bf16_reason,
                "auto_dtype": str(cpu_auto).removeprefix("torch."), "auto_dtype_reason": cpu_auto_reason,
                "int8_matmul": int8_method, "int8_matmul_reason": int8_reason},
        "threads": {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads()},
        "cuda": {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda, "devices": cuda},
        "auto_dtype": {"device": "cuda" if torch.cuda.is_available() else "cpu",
                       "dtype": str(auto).removeprefix("torch."), "reason": auto_reason},
        "triton": {"version": _version("triton"), "kernels_registered": kernels_registered,
                   "error": kernels_error},
        "native_cpu_kernels": cpu_native.build_state(),
        "versions": {name: _version(name) for name in PACKAGES},
        "env": {v: os.environ[v] for v in ENV_VARS if v in os.environ},
    }


def report(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`collect`'s dict."""
    cpu, nat = info["cpu"], info["native_cpu_kernels"]
    flags = " ".join(f for f, on in cpu["flags"].items() if on) or "-"
    lines = [
        f"python        {info['python']} on {info['platform']}",
        f"cpu           {cpu['name']} ({cpu['architecture']}), capability {cpu['capability']}, "
        f"{cpu['cores']['logical']} logical cores",
        f"cpu flags     {flags}",
        f"native bf16   {'yes' if cpu['native_bf16'] else 'no'}: {cpu['native_bf16_reason']}",
        f"dtype auto    {info['auto_dtype']['dtype']} on {info['auto_dtype']['device']}: {info['auto_dtype']['reason']}",
        f"int8 matmul   {cpu['int8_matmul']}: {cpu['int8_matmul_reason']}",
        f"threads       torch {info['threads']['torch']}, interop {info['threads']['interop']}",
    ]
    if info["cuda"]["devices"]:
        for d in info["cuda"]["devices"]:
            lines.append(f"cuda:{d['index']}        {d['name']}, compute capability {d['capability']}, "
                         f"{d['memory_gib']} GiB (CUDA {info['cuda']['torch_cuda']})")
    else:
        lines.append(f"cuda          none visible (torch built with CUDA {info['cuda']['torch_cuda']})")
    tri = info["triton"]
    kern = ", ".join(tri["kernels_registered"]) or (tri["error"] or "none registered")
    lines.append(f"triton        {tri['version'] or 'not installed'}; qtune kernels: {kern}")
    lines.append(f"C kernels     {'built: ' + nat['library'] if nat['built'] else 'not built: ' + str(nat['error'])}")
    lines.append("versions      " + ", ".join(f"{k} {v or '-'}" for k, v in info["versions"].items()))
    if info["env"]:
        lines.append("environment   " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    return "\n".join(lines)


def _main(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else report(info))
    return 0
