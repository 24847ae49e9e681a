"""One results file per benchmark run: the numbers, the exact command, and the machine they came from.

Every number the README quotes traces back to a file written here (``bench/results/<name>.json``) and the
command stored inside it. The schema is the same for every benchmark::

    {
      "benchmark": "formats",                 # which bench wrote it
      "command": "python -m qtune.bench.formats --skip-gptq",
      "created": "2026-11-30T23:30:00Z",      # UTC, ISO 8601
      "machine": {...},                       # :func:`machine_info`
      "results": {...}                        # the bench's own numbers (JSON-serialisable)
    }
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_KEYS = ("benchmark", "command", "created", "machine", "results")

# versions worth knowing when a number is compared across machines
_PACKAGES = ("torch", "triton", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "gguf")
# environment variables that change which kernels run or how many threads they get
_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "QTUNE_NATIVE_CPU", "QTUNE_INT8_MATMUL",
        "CUDA_VISIBLE_DEVICES")


def default_dir() -> Path:
    """``bench/results/`` under the current directory (run benches from the repository root)."""
    return Path("bench") / "results"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``uptime``), rounded to 0.01; None where the OS has none.

    Ratios measured on a shared machine are only comparable with the load they were measured under.
    """
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def qtune_choices() -> dict[str, Any]:
    """What qtune picks on this CPU, with its reasons (:mod:`qtune.hardware`): ``dtype: auto`` and the int8
    matmul. A results file then says which kernels its numbers come from (an emulated AVX2 run included)."""
    import torch

    from ..hardware import auto_dtype, int8_matmul_method

    dtype, dtype_reason = auto_dtype("cpu")
    method, method_reason = int8_matmul_method("cpu")
    return {"auto_dtype": str(dtype).removeprefix("torch."), "auto_dtype_reason": dtype_reason,
            "int8_matmul": method, "int8_matmul_reason": method_reason}


def machine_info() -> dict[str, Any]:
    """CPU kind and capability, cores, load, GPUs, and package versions of this process.

    ``cpu_capability`` is what torch dispatches to (``ATEN_CPU_CAPABILITY`` lowers it); ``env`` records the
    variables that change which kernels run, so an emulated AVX2-only run says so.
    """
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "env": {k: os.environ[k] for k in _ENV if k in os.environ},
        "cuda": None,
        "versions": {p: _version(p) for p in _PACKAGES},
    }
    info["qtune"] = qtune_choices()
    if torch.cuda.is_available():
        info["cuda"] = {
            "runtime": torch.version.cuda,
            "devices": [{"name": torch.cuda.get_device_name(i),
                         "capability": list(torch.cuda.get_device_capability(i))}
                        for i in range(torch.cuda.device_count())],
        }
    return info


def command_line() -> str:
    """How this process was started, as a shell command (``python -m pkg.mod args`` for ``-m`` runs)."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return shlex.join(["python", "-m", name, *argv[1:]])
    return shlex.join(["python", *argv])


def bench_command(module: str, argv: list[str] | None) -> str:
    """The command to record for a bench's ``main(argv)``: ``python -m module argv...`` when called with
    ``argv`` (from Python, e.g. a test), else how this process was started (:func:`command_line`)."""
    if argv is None:
        return command_line()
    return shlex.join(["python", "-m", module, *argv])


def write_results(benchmark: str, results: Any, out: str | os.PathLike | None = None,
                  command: str | None = None) -> Path:
    """Write ``results`` with the command and machine to a JSON file, atomically.

    Args:
        benchmark: short name of the bench (``"formats"``, ``"gpu"``, ...).
        results: the bench's numbers; anything ``json.dumps`` accepts.
        out: a file path, or a folder (the file is then ``<folder>/<benchmark>.json``); default
            ``bench/results/<benchmark>.json``.
        command: the command to record; default :func:`command_line`.

    Returns:
        The path written.
    """
    path = Path(out) if out is not None else default_dir()
    if path.suffix != ".json":
        path = path / f"{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": benchmark,
        "command": command if command is not None else command_line(),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "results": results,
    }
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_and_report(benchmark: str, results: Any, out: str | os.PathLike | None, argv: list[str] | None) -> int:
    """The end of a bench's ``main(argv)``: :func:`write_results` (to ``out``, default
    ``bench/results/<benchmark>.json``) with the ``python -m qtune.bench.<benchmark>`` command, print the
    path; returns the exit status 0."""
    path = write_results(benchmark, results, out or None, command=bench_command(f"qtune.bench.{benchmark}", argv))
    print(f"wrote {path}")
    return 0


def read_results(path: str | os.PathLike, benchmark: str | None = None) -> dict[str, Any]:
    """Load a results file and check that it has the common schema.

    Args:
        path: the JSON file.
        benchmark: when given, the file must have been written by this bench.

    Raises:
        ValueError: the file is not a JSON object, a key of :data:`SCHEMA_KEYS` is missing, ``command`` is
            not a non-empty string, ``machine`` is not an object, or ``benchmark`` differs (each names the file).
    """
    with open(path, encoding="utf-8") as f:
        try:
            payload = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a qtune results file (a JSON {type(payload).__name__}, not an object)")
    missing = [k for k in SCHEMA_KEYS if k not in payload]
    if missing:
        raise ValueError(f"{path}: not a qtune results file (missing key(s) {', '.join(missing)})")
    if not isinstance(payload["command"], str) or not payload["command"].strip():
        raise ValueError(f"{path}: 'command' must be the non-empty command that wrote it, got {payload['command']!r}")
    if not isinstance(payload["machine"], dict):
        raise ValueError(f"{path}: 'machine' must be an object, got {type(payload['machine']).__name__}")
    if benchmark is not None and payload["benchmark"] != benchmark:
        raise ValueError(f"{path}: written by bench {payload['benchmark']!r}, expected {benchmark!r}")
    return payload
